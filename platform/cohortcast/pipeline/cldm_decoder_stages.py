"""The CLDM job's `segmentation` and `report` stages (training/cldm_decoder_stages.py),
wired into the job: their keys (stage settings, the models config they build from, the
latent cache, the LM, the workers), the best-validation weights kept and exported. The
workers read the cache themselves: no Ray Datasets go out.

Called from CLDMJob as `stage_segmentation(job, runs, card, cache)` and
`stage_report(job, runs, card, cache)`; each returns the decoder's folder."""

from __future__ import annotations

import copy
from pathlib import Path

from cohortcast.config import flatten
from cohortcast.config.cldm import wired_models
from cohortcast.io import stage_outputs as outputs


def _train(job, runs, name: str, key: str, worker_loop, loop_config: dict, export, params: dict) -> Path:
    # keyed: a best file written under other settings is never exported for these
    best = job.runner.output / f"{name}-{key}.best.safetensors"
    return job.runner.train(
        runs,
        name,
        key,
        worker_loop,
        {**loop_config, "best_path": str(best)},
        dict,  # no Ray Datasets: the workers read the cache (and masks) themselves
        export,
        params,
        folder=job.runner.output / name,
        best=str(best),
    )


def stage_segmentation(job, runs, card: dict, cache: str | Path) -> Path:
    """Train (or find up to date) the segmentation decoder; returns its folder."""
    from cohortcast.training.cldm_decoder_stages import export_segmentation, segmentation_worker_loop

    cfg = job.cfg
    stage = cfg.cldm.training.segmentation
    models = wired_models(cfg.cldm)
    ingested = card["config"]["output"]
    workers = cfg.training.scaling.num_workers
    # The decoder's own sizes and the tokens it reads (not the forecaster's: retuning the
    # denoiser must not retrain the decoder).
    key = outputs.stage_key("segmentation", stage, models.latent, models.segmentation, str(cache), workers)
    loop_config = {"stage": stage, "models": models, "cache": str(cache), "ingested": str(ingested)}
    return _train(
        job,
        runs,
        "segmentation",
        key,
        segmentation_worker_loop,
        loop_config,
        lambda source, folder: export_segmentation(models, source, folder),
        flatten(stage, "cldm.training.segmentation")
        | flatten(models.segmentation, "cldm.models.segmentation")
        | {"cache": str(cache)},
    )


def stage_report(job, runs, card: dict, cache: str | Path) -> Path:
    """Train (or find up to date) the report decoder (LM: `cldm.models.report.lm_path`,
    or the tiny debug GPT-2, pipeline/cldm_tiny_lm); returns its folder."""
    from cohortcast.pipeline.cldm_tiny_lm import ensure_report_lm
    from cohortcast.training.cldm_decoder_stages import export_report, report_worker_loop

    cfg = job.cfg
    stage = cfg.cldm.training.report
    models = copy.deepcopy(wired_models(cfg.cldm))
    models.report.lm_path = ensure_report_lm(cfg, cache)
    workers = cfg.training.scaling.num_workers
    tiny = cfg.cldm.training.tiny_lm if cfg.cldm.models.report.lm_path is None else None
    key = outputs.stage_key("report", stage, models.latent, models.report, tiny, str(cache), workers)
    loop_config = {"stage": stage, "models": models, "cache": str(cache)}
    return _train(
        job,
        runs,
        "report",
        key,
        report_worker_loop,
        loop_config,
        lambda source, folder: export_report(models, source, folder),
        flatten(stage, "cldm.training.report") | flatten(models.report, "cldm.models.report") | {"cache": str(cache)},
    )
