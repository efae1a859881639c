"""The CLDM job's `diffusion` and `regressor` stages (training/cldm_diffusion_stage.py),
wired into the job: their keys (settings, models, the latent cache, the decoders they
train through, the workers), the target scales fitted on the training trajectories
before the workers start, the best-validation weights kept and exported."""

from __future__ import annotations

import copy
from pathlib import Path

from cohortcast.config import flatten
from cohortcast.config.cldm import wired_models
from cohortcast.io import stage_outputs as outputs


def _marker_key(folder: Path | None) -> str | None:
    marker = outputs.read_marker(folder) if folder is not None else None
    return marker.get("key") if marker else None


def stage_forecaster(
    job,
    runs,
    card: dict,
    kind: str,
    cache: str | Path,
    segmentation: Path | None,
    report: Path | None,
) -> Path:
    """Train (or find up to date) the `diffusion` or `regressor` stage; returns its folder
    (a CLDMForecaster / StudyRegressor folder)."""
    from cohortcast.training.cldm_diffusion_stage import (
        cldm_diffusion_worker_loop,
        export_forecaster,
        fit_target_scales,
        load_split,
    )

    cfg = job.cfg
    t = cfg.cldm.training
    stage = getattr(t, kind)
    models = wired_models(cfg.cldm)
    ingested = card["config"]["output"]
    workers = cfg.training.scaling.num_workers
    key = outputs.stage_key(
        kind,
        stage,
        models,
        t.forecast_validation,
        str(cache),
        _marker_key(segmentation),
        _marker_key(report),
        workers,
    )
    folder = job.runner.output / kind
    fitted = copy.deepcopy(models)
    loop_config = {
        "kind": kind,
        "stage": stage,
        "models": fitted,
        "cache": str(cache),
        "ingested": str(ingested),
        "segmentation": str(segmentation) if segmentation is not None else None,
        "report": str(report) if report is not None and stage.micro_batch_2d > 0 else None,
        "validation": t.forecast_validation,
        # keyed: a best file from other settings is never exported for these
        "best_path": str(job.runner.output / f"{kind}-{key}.best.safetensors"),
    }
    best = Path(loop_config["best_path"])

    def datasets() -> dict:
        # Called only when the stage trains, before the loop config goes out: completes
        # the model config with the target scales every worker must share.
        fit_target_scales(fitted, load_split(str(cache), str(ingested), "train", fitted))
        return {}

    return job.runner.train(
        runs,
        kind,
        key,
        cldm_diffusion_worker_loop,
        loop_config,
        datasets,
        lambda source, out: export_forecaster(kind, fitted, source, out),
        flatten(stage, f"cldm.training.{kind}")
        | flatten(models, "cldm.models")
        | flatten(t.forecast_validation, "cldm.training.forecast_validation"),
        folder=folder,
        best=str(best),
    )
