"""The sweep job, for the job `tune.job` names (tuning/jobs.py): cohort -> ingest once
-> for each distinct upstream (NAMD: VAE settings such as tau_f, tau_z; CLDM: encoder
and decoder settings) the job's shared stages once (NAMD: VAE, latent cache and
unconditional LDM; CLDM: encoder, study latent cache, segmentation and report decoders)
-> a Ray Tune grid over `tune.grid`, each trial the job's trial stage (NAMD: the
conditional LDM; CLDM: the diffusion stage) as its own Ray Train run -> a summary table
and the best configuration as a ready-to-run train_namd / train_cldm config, all in MLflow.

Resuming: a rerun with the same `tune.output` restores the Tune experiment (finished
trials are kept, unfinished and errored ones run again, resuming their Ray Train
checkpoints) and reopens the same MLflow parent run."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cohortcast.config import to_dict
from cohortcast.config.paths import resolve_paths
from cohortcast.config.schema import CohortcastConfig
from cohortcast.errors import CohortcastError
from cohortcast.tuning.grid import (
    concurrent_trials,
    grid_points,
    trial_config,
    trial_name,
    trials_base,
    upstream_config,
    upstream_key,
    with_values,
)
from cohortcast.tuning.jobs import JOBS, sweep_job
from cohortcast.tuning.trial import TRIAL_TAG, SweepContext, sweep_trial

log = logging.getLogger(__name__)
SWEEP_STATE = "sweep.json"  # the MLflow parent run id, for a resumed sweep


class SweepFailed(CohortcastError, RuntimeError):
    """No trial finished: nothing to select."""

    http_status = 500


@dataclass
class SweepReport:
    rows: list[dict[str, Any]]  # one per trial: name, grid values, status, metrics, forecaster
    best: dict[str, Any] | None
    best_config: str | None
    upstreams: int
    max_concurrent_trials: int
    metric: str
    mlflow: str
    job: str = "namd"


def prepare_upstreams(cfg: CohortcastConfig, runs, card: dict, trials: list[CohortcastConfig]) -> dict[str, dict]:
    """The job's shared stages once per distinct upstream key (sequential: each is itself
    a distributed Ray Train run); reruns find them up to date."""
    job = sweep_job(cfg)
    upstream: dict[str, dict] = {}
    for trial in trials:
        key = upstream_key(trial)
        if key not in upstream:
            upstream[key] = job.prepare_upstream(upstream_config(trial), runs, card)
    return upstream


def shared_datasets(trials: list[CohortcastConfig], upstream: dict[str, dict]) -> dict[tuple, dict]:
    """Datasets every not-yet-finished trial of an upstream shares, built once (NAMD's
    trajectory datasets; a CLDM trial's workers read the latent cache themselves)."""
    return sweep_job(trials[0]).shared_datasets(trials, upstream) if trials else {}


def asha_scheduler(cfg: CohortcastConfig):
    """ASHA on `tune.asha.metric` (lower is better), one rung step per Train report; None
    when disabled. A trial reports at most max_steps times (log_every >= 1)."""
    from ray.tune.schedulers import ASHAScheduler

    asha = cfg.tune.asha
    if not asha.enabled:
        return None
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=asha.metric,
        mode="min",
        max_t=max(sweep_job(cfg).max_steps(cfg), asha.grace_period),
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def run_trials(cfg: CohortcastConfig, context: SweepContext, concurrency: int):
    """The Tune experiment under `<tune.output>/ray_tune/<tune.name>`, restored if present."""
    from ray import tune

    # The trial only drives a Ray Train run (its workers reserve the CPUs/GPUs); Tune
    # refuses an empty request, so the driver reserves one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), {"CPU": 0, "memory": 1})
    path = Path(cfg.tune.output) / "ray_tune" / cfg.tune.name
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the sweep at %s (finished trials are kept)", path)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
    tuner = tune.Tuner(
        trainable,
        param_space={key: tune.grid_search(values) for key, values in cfg.tune.grid.items()},
        tune_config=tune.TuneConfig(
            scheduler=asha_scheduler(cfg),
            max_concurrent_trials=concurrency,
            trial_name_creator=lambda t: trial_name(t.config),
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=str(path.parent), verbose=1),
    )
    return tuner.fit()


def summary_rows(results, cfg: CohortcastConfig) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        values = {k: result.config[k] for k in cfg.tune.grid}
        metrics = result.metrics or {}
        status = "error" if result.error else "finished" if "stage_status" in metrics else "stopped early"
        row = {
            "trial": trial_name(values),
            **values,
            "status": status,
            cfg.tune.metric: metrics.get(cfg.tune.metric) if status == "finished" else None,
        }
        row.update({k: v for k, v in metrics.items() if k.startswith("val/") and k != cfg.tune.metric})
        row.update(
            forecaster=metrics.get("forecaster"),
            mlflow_run_id=metrics.get("mlflow_run_id"),
            error=str(result.error).splitlines()[0][:300] if result.error else "",
        )
        rows.append(row)
    return rows


def pick_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r["status"] == "finished" and isinstance(r.get(metric), (int, float))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda r: r[metric])


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(user_cfg: CohortcastConfig, rows, best, folder: Path) -> str | None:
    """summary.csv, summary.md and best_config.yaml (the user's config + the best grid
    values: `python jobs/train_namd.py --config <it>`, or train_cldm.py), each written
    atomically."""
    import pandas as pd

    from cohortcast.io.atomic import write_text_atomic

    columns = ["trial", *user_cfg.tune.grid, "status", user_cfg.tune.metric, "forecaster"]
    write_text_atomic(folder / "summary.csv", pd.DataFrame(rows).to_csv(index=False))
    write_text_atomic(folder / "summary.md", markdown_table(rows, columns) + "\n")
    if best is None:
        return None
    best_cfg = with_values(user_cfg, {k: best[k] for k in user_cfg.tune.grid})
    best_cfg.run_name = f"{user_cfg.run_name}-best"
    header = (
        f"# Best of sweep {user_cfg.tune.name!r} by {user_cfg.tune.metric} ({user_cfg.tune.mode}): "
        f"{best['trial']} -> {best[user_cfg.tune.metric]:.6g}\n"
        f"# Run it: python {sweep_job(user_cfg).train_script} --config {folder / 'best_config.yaml'}\n"
    )
    write_text_atomic(folder / "best_config.yaml", header + yaml.safe_dump(to_dict(best_cfg), sort_keys=False))
    return str(folder / "best_config.yaml")


def _close_stopped_trial_runs(runs) -> None:
    """Trials ASHA stopped never reached the end of their MLflow run: mark them KILLED."""
    if not runs.enabled:
        return
    query = f"tags.`mlflow.parentRunId` = '{runs.parent_id}' and attributes.status = 'RUNNING'"
    for run in runs.client.search_runs([runs.experiment_id], query):
        if TRIAL_TAG in run.data.tags:
            runs.client.set_terminated(run.info.run_id, "KILLED")


def _previous_sweep_run(folder: Path) -> str | None:
    state = folder / SWEEP_STATE
    return json.loads(state.read_text()).get("mlflow_run_id") if state.is_file() else None


def run_sweep(user_cfg: CohortcastConfig) -> SweepReport:
    import ray

    from cohortcast.data.prepare import prepare_cohort
    from cohortcast.io.atomic import write_text_atomic
    from cohortcast.ray_runtime import ensure_ray
    from cohortcast.tracking.job_runs import JobRuns, card_summary

    cfg = resolve_paths(user_cfg)
    job = sweep_job(cfg)
    points = grid_points(cfg.tune.grid)
    trials = [trial_config(cfg, p) for p in points]  # every grid point validated before any work
    for trial in trials:
        job.check(trial)
    ensure_ray(cfg.ray)
    folder = Path(cfg.tune.output)
    folder.mkdir(parents=True, exist_ok=True)
    concurrency = concurrent_trials(cfg, ray.cluster_resources())
    with JobRuns(
        cfg,
        run_name=f"{cfg.run_name}-sweep",
        tags={"cohortcast.sweep": cfg.tune.name},
        resume_run_id=_previous_sweep_run(folder),
    ) as runs:
        if runs.parent_id:
            write_text_atomic(folder / SWEEP_STATE, json.dumps({"mlflow_run_id": runs.parent_id}))
        card = prepare_cohort(cfg)
        runs.log_dict(runs.parent_id, card_summary(card), "dataset/ingest_card.json")
        runs.log_dict(
            runs.parent_id,
            {
                "job": cfg.tune.job,
                "grid": cfg.tune.grid,
                "trials": len(points),
                "metric": cfg.tune.metric,
                "mode": cfg.tune.mode,
                "max_concurrent_trials": concurrency,
            },
            "sweep/grid.json",
        )
        job.before_upstreams(cfg, card)
        upstream = prepare_upstreams(cfg, runs, card, trials)
        log.info("%d trial(s), %d upstream(s), up to %d at once", len(points), len(upstream), concurrency)
        datasets = shared_datasets(trials, upstream)
        base = trials_base(cfg, concurrency, ray.cluster_resources())
        context = SweepContext(base, runs.parent_id, upstream, datasets, tracking_uri=runs.uri)
        results = run_trials(cfg, context, concurrency)
        _close_stopped_trial_runs(runs)
        rows = summary_rows(results, cfg)
        best = pick_best(rows, cfg.tune.metric, cfg.tune.mode)
        best_config = write_outputs(user_cfg_with_output(user_cfg, cfg), rows, best, folder)
        for name in ("summary.csv", "summary.md") + (("best_config.yaml",) if best_config else ()):
            if runs.enabled:
                runs.client.log_artifact(runs.parent_id, str(folder / name), "sweep")
        if best is not None:
            runs.log_metrics(runs.parent_id, {f"best/{cfg.tune.metric}": best[cfg.tune.metric]})
            runs.log_dict(
                runs.parent_id, {"trial": best["trial"], **{k: best[k] for k in cfg.tune.grid}}, "sweep/best.json"
            )
        report = SweepReport(
            rows, best, best_config, len(upstream), concurrency, cfg.tune.metric, runs.location(), cfg.tune.job
        )
        if best is None:
            raise SweepFailed("no trial finished with a value for " + cfg.tune.metric + ":\n" + format_sweep(report))
        return report


def user_cfg_with_output(user_cfg: CohortcastConfig, resolved: CohortcastConfig) -> CohortcastConfig:
    """The user's config (relative paths kept, so it runs anywhere) with `workdir`
    resolved: the best config then names the same cohort and outputs from any folder."""
    out = copy.deepcopy(user_cfg)
    out.workdir = resolved.workdir
    return out


def format_sweep(report: SweepReport) -> str:
    columns = ["trial", "status", report.metric]
    job = JOBS[report.job]
    lines = [
        f"{job.title} sweep: {len(report.rows)} trial(s), {report.upstreams} upstream(s) ({job.upstream_what}), "
        f"up to {report.max_concurrent_trials} trial(s) at once",
        markdown_table(report.rows, columns),
    ]
    if report.best:
        lines.append(f"best by {report.metric}: {report.best['trial']} ({report.best[report.metric]:.4g})")
        lines.append(f"best config: {report.best_config}")
    lines.append(report.mlflow)
    return "\n".join(lines)
