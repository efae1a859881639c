"""How a Forecaster's input crops are cut and scaled, saved with the model.

A Forecaster only works on crops cut exactly as its training crops were: the same size
in pixels, pixel spacing and HU window / normalisation. The training pipeline records
them from the ingested cohort's card into the Forecaster folder (forecaster.json,
"preprocessing"), and serving and cohort forecasting take them from the model, so no
second config has to match the training one by hand.

The field names are IngestConfig's: code that crops with an IngestConfig
(serving.studies, inference.forecast_outputs) accepts this object unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FIELDS = ("crop_size", "crop_spacing_mm", "hu_window", "normalise")


@dataclass(frozen=True)
class CropPreprocessing:
    crop_size: int  # pixels per side
    crop_spacing_mm: float  # pixel spacing of the crop grid, in patient space
    hu_window: tuple[float, float]  # HU clipped to this window...
    normalise: str  # ...then scaled: "minus_one_one" or "zero_one" (transforms.window)

    @classmethod
    def from_ingest(cls, ingest: Any) -> CropPreprocessing:
        """From an IngestConfig, or its dict form (an ingested cohort's card["config"])."""
        get = ingest.get if isinstance(ingest, Mapping) else (lambda name: getattr(ingest, name))
        low, high = get("hu_window")
        return cls(
            int(get("crop_size")), float(get("crop_spacing_mm")), (float(low), float(high)), str(get("normalise"))
        )

    @classmethod
    def from_ingested(cls, folder: str | Path) -> CropPreprocessing:
        """From an ingested cohort folder (its card.json)."""
        card = json.loads((Path(folder) / "card.json").read_text())
        return cls.from_ingest(card["config"])

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CropPreprocessing:
        return cls.from_ingest(values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["hu_window"] = list(self.hu_window)
        return values

    def differences(self, other: CropPreprocessing) -> list[str]:
        """'field: mine vs other' for every field that differs (empty: same crops)."""
        return [
            f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in FIELDS
            if getattr(self, name) != getattr(other, name)
        ]

    def applied_to(self, ingest: Any) -> Any:
        """A copy of an IngestConfig with these crop settings (the rest kept)."""
        import dataclasses

        return dataclasses.replace(ingest, **{name: getattr(self, name) for name in FIELDS})
