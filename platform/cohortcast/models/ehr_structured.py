"""Structured EHR token: the 13 NAMD EHR features as numbers, through a small learned
projection, for the denoiser's EHR context slot.

The paper reads the EHR through a frozen MedGemma with soft prompts. On a CPU we can
only run a tiny randomly initialised LM, which carries no information about the
record, so forecasts conditioned on it cannot use the EHR at all. This encoder is the
CPU-sized stand-in that does carry it (ConditionerConfig.kind = "structured").

Encoding (`ehr_vector`): diameters in cm and age in decades as numbers, every
categorical as a one-hot, yes/no as +1/-1, and for each field a "missing" indicator,
so a missing value is never confused with a real zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cohortcast.config.models import ConditionerConfig
from cohortcast.data.manifest import ATTENUATIONS, LOBES, MARGINS

_YES_NO_FIELDS = ("diagemph", "famfather", "fammother", "fambrother", "famsister", "famchild")
_CATEGORICAL = (
    ("gender", ("Male", "Female")),
    ("SCT_PRE_ATT", ATTENUATIONS),
    ("SCT_MARGINS", MARGINS),
    ("SCT_EPI_LOC", LOBES),
)
_NUMERIC = (("age", 10.0), ("SCT_LONG_DIA", 10.0), ("SCT_PERP_DIA", 10.0))  # (field, unit)


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip() != ""


def ehr_vector(record: Mapping[str, Any]) -> list[float]:
    """One EHR record (manifest column names) -> a fixed-length list of floats."""
    out: list[float] = []
    for name, unit in _NUMERIC:
        value = record.get(name)
        out += [float(value) / unit, 0.0] if _present(value) else [0.0, 1.0]
    for name in _YES_NO_FIELDS:
        value = str(record.get(name)).strip().lower() if _present(record.get(name)) else None
        out += [{"yes": 1.0, "no": -1.0}.get(value, 0.0), float(value not in ("yes", "no"))]
    for name, choices in _CATEGORICAL:
        value = str(record.get(name)) if _present(record.get(name)) else None
        out += [float(value == c) for c in choices] + [float(value not in choices)]
    return out


EHR_VECTOR_SIZE = len(ehr_vector({}))


class StructuredEHREncoder(nn.Module):
    """records -> (B, structured_hidden): a two-layer MLP over `ehr_vector`."""

    def __init__(self, cfg: ConditionerConfig):
        super().__init__()
        self.cfg = cfg
        self.hidden_size = cfg.structured_hidden
        self.mlp = nn.Sequential(
            nn.Linear(EHR_VECTOR_SIZE, cfg.structured_hidden),
            nn.GELU(),
            nn.Linear(cfg.structured_hidden, cfg.structured_hidden),
        )

    def encode_records(self, records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        device = self.mlp[0].weight.device
        vectors = torch.tensor([ehr_vector(r) for r in records], dtype=torch.float32, device=device)
        return self.mlp(vectors.to(self.mlp[0].weight.dtype)).float()
