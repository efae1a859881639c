"""The sweep job (`jobs/tune_namd.py`, `cohortcast tune`): grid, selection metric,
early stopping, concurrency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cohortcast.config.loader import require as _require


def _default_grid() -> dict[str, list[Any]]:
    # CLDM Sec. 3's lambda grid and NAMD Eq. 2's alignment temperatures.
    return {
        "training.task_weight": [0.1, 0.5, 1.0, 2.0],
        "model.vae.loss.tau_f": [0.5, 1.0],
        "model.vae.loss.tau_z": [0.5, 1.0],
    }


@dataclass
class AshaConfig:
    """Optional ASHA early stopping, fed by the conditional stage's intermediate reports.
    `metric` must be in every report (the training losses are; validation metrics only
    at the end): the diffusion loss is comparable across lambda, the total loss is not."""

    enabled: bool = False
    metric: str = "loss/diffusion"
    grace_period: int = 2  # reports before a trial may be stopped
    reduction_factor: float = 2.0


@dataclass
class TuneConfig:
    """`grid`: dotted config keys -> the values to try (every combination is a trial).
    Keys that change only the conditional stage (lambda, `training.ldm_cond.*`) share one
    VAE, latent cache and unconditional LDM; keys that change the VAE (tau_f, tau_z) get
    one of each per distinct value. `metric`/`mode`: what picks the best trial (from the
    final report, which holds the validation metrics). `max_concurrent_trials`: None =
    as many as the cluster's CPUs (or GPUs) fit, given the workers each trial needs."""

    output: str = "runs/demo/tune"
    name: str = "namd-sweep"
    grid: dict[str, list[Any]] = field(default_factory=_default_grid)
    metric: str = "val/forecast_mae"
    mode: Literal["min", "max"] = "min"
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = None

    def validate(self) -> None:
        _require(
            bool(self.grid) and all(isinstance(v, list) and v for v in self.grid.values()),
            "grid",
            "needs at least one key with a non-empty list of values",
        )
        _require(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            "max_concurrent_trials",
            "must be >= 1 (or unset)",
        )
        _require(
            self.asha.grace_period >= 1 and self.asha.reduction_factor > 1,
            "asha",
            "needs grace_period >= 1 and reduction_factor > 1",
        )
