"""The CLDM cohort forecasting job's settings (`cldm.forecast`, jobs/forecast_cldm.py)."""

from __future__ import annotations

from dataclasses import dataclass

from cohortcast.config.loader import require as _require
from cohortcast.config.models import SAMPLERS

KINDS = ("ct", "radiograph")
METHODS = ("diffusion", "regressor")


@dataclass
class CLDMForecastJobConfig:
    """Every follow-up study of `split` (CT and/or radiograph, `kinds`), forecast from all
    its earlier studies of the same kind (the most recent `temporal.max_exams`) by the
    CLDM training output `model` (a CLDMBundle), `num_samples` seeded samples by `sampler`
    ("ddim" | "dpmsolver++"; None: the bundle's scheduler config) with `inference_steps`
    steps each (`method: regressor`: the no-diffusion baseline). CT
    cases whose last prior has an ILD mask also get the anchored forecast. The real
    follow-up (mask, report) is kept next to each forecast for evaluation."""

    model: str = "runs/cldm/train"
    ingested: str = "runs/cldm/ingested"
    split: str = "test"
    output: str = "runs/cldm/forecasts"
    kinds: tuple[str, ...] = KINDS
    method: str = "diffusion"
    num_samples: int = 4
    inference_steps: int = 20
    sampler: str | None = None
    seed: int = 0
    actors: int = 1
    cases_per_batch: int = 4
    write_nifti: bool = True
    max_cases: int | None = None  # forecast at most this many not-yet-done cases (then stop)

    def validate(self) -> None:
        _require(self.split in ("train", "val", "test"), "split", "must be train, val or test")
        unknown = [k for k in self.kinds if k not in KINDS]
        _require(
            bool(self.kinds) and not unknown, "kinds", f"choose one or more of {list(KINDS)}, got {list(self.kinds)}"
        )
        _require(self.method in METHODS, "method", f"must be one of {list(METHODS)}, got {self.method!r}")
        _require(self.num_samples >= 1 and self.inference_steps >= 1, "num_samples", "samples and steps must be >= 1")
        _require(self.actors >= 1 and self.cases_per_batch >= 1, "actors", "actors and cases_per_batch must be >= 1")
        _require(self.sampler in (None, *SAMPLERS), "sampler", f"must be null or one of {', '.join(SAMPLERS)}")
        _require(0 <= self.seed < 2**63, "seed", "must be in 0..2**63-1")
        _require(self.max_cases is None or self.max_cases >= 0, "max_cases", "must be >= 0 (or null: all)")
