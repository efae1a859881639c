"""One sweep trial, run by Ray Tune: its job's trial stage (NAMD: the conditional LDM,
stage d; CLDM: the diffusion stage; tuning/jobs.py) on its grid point's config, as a Ray
Train run inside the trial (the Train V2 way), on the upstream the sweep prepared. Train
reports reach Tune through TuneReportCallback (ASHA sees them); the final report carries
the stage's validation metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cohortcast.config.schema import CohortcastConfig

TRIAL_TAG = "cohortcast.trial"


@dataclass
class SweepContext:
    base: CohortcastConfig  # paths resolved
    sweep_run_id: str | None  # the MLflow parent run
    # upstream key -> what its trials need (NAMD: {"vae", "denoiser": folders, "cache":
    # latent card}; CLDM: {"card": ingest card, "encoder", "latents", "segmentation", "report"})
    upstream: dict[str, dict[str, Any]]
    # NAMD: (upstream key, temporal.max_exams) -> materialized {"train", "val"} trajectory
    # datasets, built once by the sweep (a groupby shuffle each) instead of once per trial
    datasets: dict[tuple, dict]
    tracking_uri: str | None = None  # the sweep's MLflow store: trials log there too


def trial_stage(values: dict[str, Any], context: SweepContext, callbacks: list) -> dict[str, Any]:
    """The trial's work: its job's trial stage under its own MLflow run (a child of the
    sweep's run); returns the final report for Tune."""
    from cohortcast.tracking.job_runs import JobRuns
    from cohortcast.tuning.grid import trial_config, trial_name, upstream_key
    from cohortcast.tuning.jobs import sweep_job

    cfg = trial_config(context.base, values)
    job = sweep_job(cfg)
    upstream = context.upstream[upstream_key(cfg)]
    name = trial_name(values)
    tags = {TRIAL_TAG: name}
    with JobRuns(
        cfg, nested_in=context.sweep_run_id, run_name=name, tags=tags, tracking_uri=context.tracking_uri
    ) as runs:
        runs.log_params(runs.parent_id, {f"trial.{k}": v for k, v in values.items()})
        folder, stage = job.train_trial(cfg, runs, upstream, context, callbacks)
        runs.log_metrics(runs.parent_id, stage.metrics)
    return {
        **stage.metrics,
        "forecaster": str(folder),
        "stage_status": stage.status,
        "mlflow_run_id": runs.parent_id or "",
    }


def sweep_trial(values: dict[str, Any], context: SweepContext) -> None:
    """The Tune trainable. Tune runs it inside a placement group that captures child
    tasks, and its bundle holds no CPU (the trial's Ray Train workers reserve those), so
    the Ray Data tasks that build the trial's datasets could never be scheduled there.
    The stage therefore runs in a task outside that placement group; Train reports still
    reach Tune through the callback created here, inside the trial's session."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    stage = ray.remote(trial_stage).options(num_cpus=0, scheduling_strategy=outside, max_retries=0)
    tune.report(ray.get(stage.remote(values, context, [TuneReportCallback()])))
