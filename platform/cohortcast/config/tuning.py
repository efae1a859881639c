"""The sweep job (`jobs/tune_namd.py`, `jobs/tune_cldm.py`, `cohortcast tune`): which
job's stage the trials train, the grid, selection metric, early stopping, concurrency."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from cohortcast.config.loader import require as _require

# Per job: the grid, the selection metric, the ASHA metric and the experiment name that
# an unset `tune.grid` / `tune.metric` / `tune.asha.metric` / `tune.name` stand for.
JOB_DEFAULTS: dict[str, dict[str, Any]] = {
    "namd": {
        # CLDM Sec. 3's lambda grid and NAMD Eq. 2's alignment temperatures.
        "grid": {
            "training.task_weight": [0.1, 0.5, 1.0, 2.0],
            "model.vae.loss.tau_f": [0.5, 1.0],
            "model.vae.loss.tau_z": [0.5, 1.0],
        },
        "metric": "val/forecast_mae",
        "asha_metric": "loss/diffusion",
        "name": "namd-sweep",
    },
    "cldm": {
        # CLDM Sec. 3's lambda: L = L_diff + lambda L_task, lambda 0 = no task loss.
        "grid": {"cldm.training.diffusion.task_weight": [0.0, 0.1, 0.5, 1.0, 2.0]},
        # The val aVD of the weights the diffusion stage keeps and exports (its best
        # validation by aVD); `val/avd` is the last validation's.
        "metric": "val/best_avd",
        "asha_metric": "loss/diffusion_3d",
        "name": "cldm-sweep",
    },
}


@dataclass
class AshaConfig:
    """Optional ASHA early stopping, fed by the trial stage's intermediate reports.
    `metric` must be in every report (the training losses are; validation metrics only
    at the end): the diffusion loss is comparable across lambda, the total loss is not.
    Unset: the job's (`loss/diffusion`; CLDM `loss/diffusion_3d`)."""

    enabled: bool = False
    metric: str | None = None
    grace_period: int = 2  # reports before a trial may be stopped
    reduction_factor: float = 2.0


@dataclass
class TuneConfig:
    """`job`: whose stage the trials train: `namd` (the conditional LDM, stage d) or
    `cldm` (the `diffusion` stage); the stages before it are trained once per distinct
    upstream and shared. `grid`: dotted config keys -> the values to try (every
    combination is a trial). NAMD: keys that change only the conditional stage (lambda,
    `training.ldm_cond.*`) share one VAE, latent cache and unconditional LDM; keys that
    change the VAE (tau_f, tau_z) get one of each per distinct value. CLDM: keys of
    `cldm.training.diffusion` / the forecaster share one encoder, study latent cache and
    decoders. `metric`/`mode`: what picks the best trial (from the final report, which
    holds the validation metrics). `max_concurrent_trials`: None = as many as the
    cluster's CPUs (or GPUs) fit, given the workers each trial needs.

    `grid`, `metric`, `asha.metric` and `name` left unset (or set to another job's
    default) are the job's defaults (JOB_DEFAULTS), filled in when the config is loaded."""

    job: Literal["namd", "cldm"] = "namd"
    output: str = "runs/demo/tune"
    name: str | None = None
    grid: dict[str, list[Any]] | None = None
    metric: str | None = None
    mode: Literal["min", "max"] = "min"
    asha: AshaConfig = field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = None

    def __post_init__(self) -> None:
        # Here, not in validate(): a config without a `tune` section gets the default
        # instance, which the loader does not validate. A value that is another job's
        # default stands for unset too: the loader merges a partial `tune` section over
        # TuneConfig() (job namd), so `tune: {job: cldm}` arrives with NAMD's defaults.
        defaults = JOB_DEFAULTS.get(self.job)
        if defaults is None:
            return  # validate() names the job
        others = [d for job, d in JOB_DEFAULTS.items() if job != self.job]

        def own(value, key):
            return defaults[key] if value is None or any(value == d[key] for d in others) else value

        self.grid = copy.deepcopy(own(self.grid, "grid"))
        self.metric = own(self.metric, "metric")
        self.name = own(self.name, "name")
        self.asha.metric = own(self.asha.metric, "asha_metric")

    def validate(self) -> None:
        _require(self.job in JOB_DEFAULTS, "job", f"must be one of {sorted(JOB_DEFAULTS)}, got {self.job!r}")
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
