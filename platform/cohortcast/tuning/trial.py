"""One sweep trial, run by Ray Tune: the conditional stage (d) of the NAMD job on its
grid point's config, as a Ray Train run inside the trial (the Train V2 way), on the
upstream the sweep prepared. Train reports reach Tune through TuneReportCallback (ASHA
sees them); the final report carries the stage's validation metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cohortcast.config.schema import CohortcastConfig

TRIAL_TAG = "cohortcast.trial"


@dataclass
class SweepContext:
    base: CohortcastConfig  # paths resolved
    sweep_run_id: str | None  # the MLflow parent run
    upstream: dict[str, dict[str, Any]]  # upstream key -> {"vae", "denoiser": folders, "cache": latent card}
    # (upstream key, temporal.max_exams) -> materialized {"train", "val"} trajectory datasets,
    # built once by the sweep (a groupby shuffle each) instead of once per trial
    datasets: dict[tuple, dict]


def conditional_stage(values: dict[str, Any], context: SweepContext, callbacks: list) -> dict[str, Any]:
    """The trial's work: stage d of its config under its own MLflow run (a child of the
    sweep's run); returns the final report for Tune."""
    from cohortcast.pipeline.namd import NAMDJob
    from cohortcast.tracking.job_runs import JobRuns
    from cohortcast.tuning.grid import trial_config, trial_name, upstream_key

    cfg = trial_config(context.base, values)
    upstream = context.upstream[upstream_key(cfg)]
    name = trial_name(values)
    job = NAMDJob(cfg, train_callbacks=callbacks)
    with JobRuns(cfg, nested_in=context.sweep_run_id, run_name=name, tags={TRIAL_TAG: name}) as runs:
        runs.log_params(runs.parent_id, {f"trial.{k}": v for k, v in values.items()})
        datasets = context.datasets.get((upstream_key(cfg), cfg.model.temporal.max_exams))
        forecaster = job.stage_ldm_cond(
            runs, upstream["cache"], Path(upstream["vae"]), Path(upstream["denoiser"]), datasets
        )
        stage = job.reports[-1]
        runs.log_metrics(runs.parent_id, stage.metrics)
    return {
        **stage.metrics,
        "forecaster": str(forecaster),
        "stage_status": stage.status,
        "mlflow_run_id": runs.parent_id or "",
    }


def namd_trial(values: dict[str, Any], context: SweepContext) -> None:
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
    stage = ray.remote(conditional_stage).options(num_cpus=0, scheduling_strategy=outside, max_retries=0)
    tune.report(ray.get(stage.remote(values, context, [TuneReportCallback()])))
