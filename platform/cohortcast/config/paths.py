"""Relative paths in a config resolve against `workdir`, once, at the start of a job:
afterwards every stage, Ray worker and MLflow param sees the same absolute paths."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from cohortcast.config.schema import CohortcastConfig

# Every path-valued field (None means "not set" and stays None).
PATH_FIELDS = (
    "ingest.manifest",
    "ingest.output",
    "training.output",
    "training.scaling.storage_path",
    "training.latent_cache.root",
    "cldm.encoder.pretrained_path",
    "cldm.training.output",
    "cldm.training.latent_cache.root",
    "cldm.models.report.lm_path",
    "cldm.evaluation.report",
    "cldm.forecast.model",
    "cldm.forecast.ingested",
    "cldm.forecast.output",
    "cldm.evaluation.cache",
    "cldm.evaluation.chexbert_checkpoint",
    "cldm.evaluation.chexbert_bert_dir",
    "model.vae.pretrained_path",
    "model.vae.loss.perceptual_vgg_path",
    "model.vae.loss.perceptual_lpips_path",
    "model.conditioner.llm_path",
    "model.denoiser.pretrained_path",
    "forecast.forecaster",
    "forecast.ingested",
    "forecast.output",
    "evaluation.evaluator_output",
    "evaluation.report",
    "evaluation.evaluator.pretrained_path",
    "evaluation.ablation.training_output",
    "evaluation.ablation.forecasts",
    "evaluation.regressor.forecasts",
    "evaluation.inception_torchscript",
    "evaluation.lpips_vgg_path",
    "evaluation.lpips_path",
    "serve.forecaster",
    "serve.cohort_output",
    "serve.evaluator",
    "serve.cldm_model",
    "tune.output",
)
# Path-list fields: every entry resolves like a path field.
PATH_LIST_FIELDS = ("serve.cohort_roots",)


def _is_uri(value: str) -> bool:
    # s3://, gs://, MLflow's models:/ and runs:/: left to the library that reads them
    return "://" in value or value.startswith(("models:/", "runs:/"))


def _owner(cfg: CohortcastConfig, dotted: str):
    *parents, leaf = dotted.split(".")
    owner = cfg
    for name in parents:
        owner = getattr(owner, name)
    return owner, leaf


def resolve_paths(cfg: CohortcastConfig) -> CohortcastConfig:
    """A copy of `cfg` with `workdir` and every relative path made absolute."""
    cfg = copy.deepcopy(cfg)
    workdir = Path(os.path.expanduser(cfg.workdir)).resolve()
    cfg.workdir = str(workdir)

    def absolute(value):
        return value if not value or _is_uri(value) else str(workdir / os.path.expanduser(value))

    for dotted in PATH_FIELDS:
        owner, leaf = _owner(cfg, dotted)
        setattr(owner, leaf, absolute(getattr(owner, leaf)))
    for dotted in PATH_LIST_FIELDS:
        owner, leaf = _owner(cfg, dotted)
        setattr(owner, leaf, [absolute(v) for v in getattr(owner, leaf)])
    return cfg
