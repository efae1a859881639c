"""CLDM stages `segmentation` and `report` (paper Sec. 3): the task decoders on
current-exam study latents, on Ray Train + DeepSpeed through the shared stage loop.

- `segmentation`: SegmentationDecoder, a CT study's tokens -> its own ILD mask on the
  ingested grid (Dice + BCE), over every CT study of the train split (a patient without
  fibrosis has an all-zero mask: the decoder must learn to predict nothing there too).
- `report`: ReportDecoder, a radiograph's tokens -> its own report (token CE), with the
  previous exam's tokens as `prior`. A first exam has none; of the other rows a share
  `prior_dropout` is trained without it, so one decoder writes reports with and without
  a prior (Table 2's +Prior column) and the forecaster's task loss can use either.

No Ray Datasets: each worker reads the study latent cache (a few MB of tokens, plus the
CT masks) with `load_trajectories(...).shard(rank, world)` and yields its own batches
(StageHooks.train_batches): an epoch is one shuffled pass over the shard's studies,
shuffled by the loop's per-epoch generator. Validation (world rank 0) reads the val
split the same way; the best weights by val aVD (segmentation) or val CE with the
prior (report) are kept and exported."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cohortcast.errors import CohortcastError
from cohortcast.models.mask_metrics import mask_dice, mask_volumes, volume_avd
from cohortcast.training.study_trajectories import StudyTrajectories, epoch_batches, load_trajectories

log = logging.getLogger(__name__)


class DecoderDataError(CohortcastError, ValueError):
    """The study latent cache cannot feed a decoder stage as configured."""


# ----- data -----------------------------------------------------------------------------


def load_split(config: dict, split: str, dims: int) -> StudyTrajectories | None:
    """One split of one study kind from the loop config's cache (CT: with the masks)."""
    ingested = config.get("ingested") if dims == 3 else None
    return load_trajectories(config["cache"], split, dims, ingested)


def require_train(trajectories: StudyTrajectories | None, config: dict, dims: int, stage_name: str):
    kind = "CT studies" if dims == 3 else "radiographs"
    if trajectories is None or not len(trajectories.studies):
        raise DecoderDataError(f"{config['cache']}: the train split has no {kind} (dims={dims}) for stage {stage_name}")
    if dims == 3 and trajectories.masks is None:
        raise DecoderDataError(f"stage {stage_name} needs the ingested CT masks: no ingested folder was given")
    return trajectories


def check_shard(shard: StudyTrajectories, rows: int, batch_size: int, rank: int, stage_name: str) -> None:
    if rows < batch_size:
        raise DecoderDataError(
            f"worker {rank} has {rows} studies ({len(shard)} patients), fewer than one micro-batch "
            f"({batch_size}): lower cldm.training.{stage_name}.micro_batch_size or the workers"
        )


def _on(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device) if device is not None else x


def segmentation_batches(
    trajectories: StudyTrajectories, batch_size: int, rng: np.random.Generator, device=None
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch: every study of `trajectories` once, shuffled by `rng`, in full batches of
    {"tokens": (B, 1 + N, dim) float32, "mask": (B, D, H, W) uint8, "rows": (B,) int64}."""
    if trajectories.masks is None:
        raise DecoderDataError("segmentation batches need the CT masks (load_trajectories with `ingested`)")
    for rows in epoch_batches(len(trajectories.studies), batch_size, rng):
        rows = np.sort(rows)  # contiguous-ish reads; the batch's order does not matter
        yield {
            "tokens": _on(torch.from_numpy(trajectories.tokens[rows]), device),
            "mask": _on(torch.from_numpy(trajectories.masks[rows]), device),
            "rows": torch.from_numpy(rows),
        }


def previous_exam_rows(trajectories: StudyTrajectories) -> np.ndarray:
    """(R,) the row of each study's previous exam of the same patient (same kind), -1 for
    a patient's first exam. Rows are by patient, then date (load_trajectories)."""
    prev = np.arange(len(trajectories.studies), dtype=np.int64) - 1
    prev[trajectories.offsets[:-1]] = -1  # each patient's first exam
    return prev


def report_rows(trajectories: StudyTrajectories) -> np.ndarray:
    """The rows with a report to learn (a study without one teaches nothing)."""
    return np.asarray([i for i, text in enumerate(trajectories.reports) if text.strip()], np.int64)


def report_batch(
    trajectories: StudyTrajectories, rows: np.ndarray, drop: np.ndarray, device=None
) -> dict[str, Any]:
    """Model inputs for `rows` with their previous exams: {"tokens", "prior" (B, 1 + N,
    dim; zeros where dropped or absent), "drop_prior" (B,) bool, "prior_row" (B,) (-1:
    none used), "texts": list of B reports}. `drop`: (B,) rows trained without the prior
    (a first exam's is forced True)."""
    prev = previous_exam_rows(trajectories)[rows]
    drop = np.asarray(drop, bool) | (prev < 0)
    used = np.where(drop, -1, prev)
    prior = trajectories.tokens[np.maximum(used, 0)]  # (B, 1 + N, dim), a copy (fancy indexing)
    prior[drop] = 0.0  # the pooler never sees a dropped prior; zeros make that evident
    return {
        "tokens": _on(torch.from_numpy(trajectories.tokens[rows]), device),
        "prior": _on(torch.from_numpy(prior), device),
        "drop_prior": _on(torch.from_numpy(drop), device),
        "prior_row": torch.from_numpy(used),
        "texts": [trajectories.reports[r] for r in rows],
    }


def report_batches(
    trajectories: StudyTrajectories, batch_size: int, prior_dropout: float, rng: np.random.Generator, device=None
) -> Iterator[dict[str, Any]]:
    """One epoch over the studies with a report, shuffled by `rng`; each row with a
    previous exam keeps it with probability 1 - prior_dropout (drawn from `rng`)."""
    rows = report_rows(trajectories)
    for idx in epoch_batches(len(rows), batch_size, rng):
        picked = rows[np.sort(idx)]
        yield report_batch(trajectories, picked, rng.random(len(picked)) < prior_dropout, device)


# ----- segmentation ---------------------------------------------------------------------


def fibrotic_fraction(trajectories: StudyTrajectories) -> float:
    """Mean V_mask / V_lung over the studies with a known lung count (the mean-fraction
    baseline's prediction)."""
    known = trajectories.lung_voxels > 0
    if not known.any():
        return 0.0
    volumes = mask_volumes(trajectories.masks[known])
    return float((volumes / trajectories.lung_voxels[known]).mean())


def segmentation_loss(engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # engine(tokens): the decoder's forward inside DeepSpeed's hooks; the loss on the module
    logits = engine(batch["tokens"])  # (B, 1, D, H, W)
    return {"total": engine.module.loss(logits.float(), batch["mask"])}


@torch.no_grad()
def validate_segmentation(
    model, val: StudyTrajectories, batch_size: int, train_fraction: float, threshold: float = 0.5
) -> dict[str, float]:
    """On every val CT study: mean loss; aVD of the thresholded prediction (studies with
    a known lung count) next to the trivial baselines' (an empty mask: V_pred = 0; the
    training mean fibrotic fraction: V_pred = fraction * V_lung); Dice over the studies
    with a fibrosis mask (an empty-empty Dice would be 1 and flatter the decoder)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    loss, pred_voxels, dice = 0.0, [], []
    for start in range(0, len(val.studies), batch_size):
        rows = np.arange(start, min(start + batch_size, len(val.studies)))
        tokens = torch.from_numpy(val.tokens[rows]).to(device, dtype)  # (B, 1 + N, dim)
        mask = torch.from_numpy(val.masks[rows]).to(device)  # (B, D, H, W)
        logits = model(tokens).float()  # (B, 1, D, H, W)
        loss += float(model.loss(logits, mask)) * len(rows)
        pred = (torch.sigmoid(logits[:, 0]) > threshold).cpu().numpy()
        pred_voxels.append(mask_volumes(pred))
        dice.append(mask_dice(pred, val.masks[rows]))
    pred_v, dice_all = np.concatenate(pred_voxels), np.concatenate(dice)
    true_v, lung = mask_volumes(val.masks), val.lung_voxels.astype(np.float64)
    known = lung > 0
    with_mask = val.has_mask
    out = {
        "loss": loss / len(val.studies),
        "avd": float(volume_avd(pred_v, true_v, lung)[known].mean()) if known.any() else float("nan"),
        "avd_empty": float(volume_avd(np.zeros_like(true_v), true_v, lung)[known].mean()) if known.any() else 0.0,
        "avd_mean_fraction": float(volume_avd(train_fraction * lung, true_v, lung)[known].mean())
        if known.any()
        else 0.0,
        "dice": float(dice_all[with_mask].mean()) if with_mask.any() else float("nan"),
        "cases": float(len(val.studies)),
        "cases_with_mask": float(with_mask.sum()),
    }
    if (known & with_mask).any():
        out["avd_with_mask"] = float(volume_avd(pred_v, true_v, lung)[known & with_mask].mean())
    return out


def segmentation_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; config: {"stage": DecoderStageConfig, "models":
    CLDMModelsConfig (wired_models), "cache": the study latent cache folder, "ingested":
    the ingested folder (masks), optional "best_path", "tracking"}."""
    import ray.train

    from cohortcast.models.segmentation_decoder import SegmentationDecoder
    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    stage, models_cfg = config["stage"], config["models"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train = require_train(load_split(config, "train", 3), config, 3, "segmentation")
    shard = train.shard(rank, world)
    check_shard(shard, len(shard.studies), stage.micro_batch_size, rank, "segmentation")
    val = load_split(config, "val", 3) if rank == 0 else None
    train_fraction = fibrotic_fraction(train)  # all train studies: the same on every rank
    del train  # the masks are the bulk of a worker's memory: keep only this worker's

    def batches(device, rng):
        return segmentation_batches(shard, stage.micro_batch_size, rng, device)

    def validate(engine, _batches):
        return validate_segmentation(engine.module, val, stage.micro_batch_size, train_fraction), {}

    has_val = val is not None and len(val.studies) > 0
    hooks = StageHooks(
        train_batches=batches,
        validate=validate if has_val else None,
        val_batches=(lambda: iter(())) if has_val else None,
        tracking=config.get("tracking"),
        best_metric="avd" if has_val else None,
        best_path=config.get("best_path"),
        validate_at_start=True,
    )
    run_stage_loop(stage, lambda: SegmentationDecoder(models_cfg, 3), segmentation_loss, hooks)


def export_segmentation(models_cfg, source, folder: str | Path) -> None:
    """The last checkpoint's consolidated weights (or the kept best val-aVD weights) ->
    a SegmentationDecoder folder."""
    from cohortcast.models.segmentation_decoder import SegmentationDecoder
    from cohortcast.training.export import consolidated_state_dict

    model = SegmentationDecoder(models_cfg, 3)
    model.load_state_dict(consolidated_state_dict(source))
    model.save(folder)


# ----- report ---------------------------------------------------------------------------


class ReportObjective(nn.Module):
    """The DeepSpeed engine's module for the report stage: ReportDecoder has no forward
    (it has loss and generate), and DeepSpeed's hooks run around the module's forward,
    so this forward is the decoder's training loss."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, texts, prior=None, drop_prior=None) -> torch.Tensor:
        return self.decoder.loss(tokens, texts, prior, drop_prior)


def build_report_decoder(models_cfg):
    """A ReportDecoder on the LM at models_cfg.report.lm_path (load_lm: local folders only)."""
    from cohortcast.models.report_decoder import ReportDecoder, load_lm

    lm, tokenizer = load_lm(models_cfg.report.lm_path)
    return ReportDecoder(models_cfg, lm, tokenizer)


def report_loss(engine, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    if engine.module.decoder.cfg.report.use_prior:
        loss = engine(batch["tokens"], batch["texts"], batch["prior"], batch["drop_prior"])
    else:
        loss = engine(batch["tokens"], batch["texts"])
    return {"total": loss}


def _dtype(module) -> torch.dtype:
    return next(module.pooler.parameters()).dtype


@torch.no_grad()
def validate_report(decoder, val: StudyTrajectories, batch_size: int) -> dict[str, float]:
    """Mean per-report token CE on the val radiographs that have a previous exam, given it
    ("ce_prior") and with it dropped ("ce_no_prior"), on the same rows so the two compare;
    and on the first exams ("ce_first", no prior exists). A decoder without use_prior
    reports "ce" over every row."""
    device = next(decoder.pooler.parameters()).device
    rows = report_rows(val)
    prev = previous_exam_rows(val)[rows]
    follow_up, first = rows[prev >= 0], rows[prev < 0]

    def mean_ce(subset: np.ndarray, drop: bool) -> float:
        if not len(subset):
            return float("nan")
        total = 0.0
        for start in range(0, len(subset), batch_size):
            part = subset[start : start + batch_size]
            batch = report_batch(val, part, np.full(len(part), drop), device)
            tokens = batch["tokens"].to(_dtype(decoder))
            if decoder.cfg.report.use_prior:
                prior = batch["prior"].to(_dtype(decoder))
                ce = decoder.loss(tokens, batch["texts"], prior, batch["drop_prior"], reduction="none")
            else:
                ce = decoder.loss(tokens, batch["texts"], reduction="none")
            total += float(ce.float().sum())
        return total / len(subset)

    if not decoder.cfg.report.use_prior:
        return {"ce": mean_ce(rows, True), "cases": float(len(rows))}
    return {
        "ce_prior": mean_ce(follow_up, False),
        "ce_no_prior": mean_ce(follow_up, True),
        "ce_first": mean_ce(first, True),
        "cases": float(len(follow_up)),
    }


@torch.no_grad()
def sample_reports(decoder, val: StudyTrajectories, cases: int) -> str:
    """Greedy reports for the first `cases` val follow-up radiographs, with and without
    the prior, next to the true report (a text artifact for a reader, not a metric)."""
    device = next(decoder.pooler.parameters()).device
    rows = report_rows(val)
    rows = rows[previous_exam_rows(val)[rows] >= 0][:cases]
    if not len(rows):
        return ""
    batch = report_batch(val, rows, np.zeros(len(rows), bool), device)
    tokens = batch["tokens"].to(_dtype(decoder))
    use_prior = decoder.cfg.report.use_prior
    with_prior = decoder.generate(tokens, prior=batch["prior"].to(_dtype(decoder))) if use_prior else None
    without = decoder.generate(tokens)
    parts = []
    for i, row in enumerate(rows):
        parts.append(f"=== {val.studies[row]} (previous exam {val.studies[row - 1]})")
        parts.append(f"--- true\n{val.reports[row]}")
        if with_prior is not None:
            parts.append(f"--- generated with the prior\n{with_prior[i]}")
        parts.append(f"--- generated without a prior\n{without[i]}")
    return "\n".join(parts) + "\n"


def _log_text(tracking: dict | None, text: str, artifact_file: str) -> None:
    """Best effort, like StageTracker: a tracking hiccup must not stop training."""
    if not tracking or not text:
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking["uri"]).log_text(tracking["run_id"], text, artifact_file)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow: could not log %s: %s", artifact_file, exc)


def report_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; config: {"stage": DecoderStageConfig, "models":
    CLDMModelsConfig with report.lm_path set, "cache", optional "cases" (generated val
    reports logged per validation, default 3), "best_path", "tracking"}."""
    import ray.train

    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    stage, models_cfg = config["stage"], config["models"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train = require_train(load_split(config, "train", 2), config, 2, "report")
    shard = train.shard(rank, world)
    check_shard(shard, len(report_rows(shard)), stage.micro_batch_size, rank, "report")
    val = load_split(config, "val", 2) if rank == 0 else None
    cases = int(config.get("cases", 3))

    def batches(device, rng):
        return report_batches(shard, stage.micro_batch_size, stage.prior_dropout, rng, device)

    def validate(engine, _batches):
        decoder = engine.module.decoder
        metrics = validate_report(decoder, val, stage.micro_batch_size)
        if cases:
            text = sample_reports(decoder, val, cases)
            _log_text(config.get("tracking"), text, f"validation/reports_step{engine.global_steps:05d}.txt")
        return metrics, {}

    has_val = val is not None and len(report_rows(val)) > 0
    best = "ce_prior" if models_cfg.report.use_prior else "ce"
    hooks = StageHooks(
        train_batches=batches,
        validate=validate if has_val else None,
        val_batches=(lambda: iter(())) if has_val else None,
        tracking=config.get("tracking"),
        best_metric=best if has_val else None,
        best_path=config.get("best_path"),
        validate_at_start=True,
    )
    run_stage_loop(stage, lambda: ReportObjective(build_report_decoder(models_cfg)), report_loss, hooks)


def export_report(models_cfg, source, folder: str | Path) -> None:
    """The consolidated weights (pooler, and the LM unless frozen: every parameter is in
    the module state) -> a ReportDecoder folder carrying its fine-tuned LM copy."""
    from cohortcast.training.export import consolidated_state_dict

    objective = ReportObjective(build_report_decoder(models_cfg))
    state = consolidated_state_dict(source)
    missing, unexpected = objective.load_state_dict(state, strict=False)
    # Tied weights (GPT-2's lm_head = wte) may be stored once: a key missing for that
    # reason is fine, any other missing or unexpected key is a wrong checkpoint.
    tied = {"decoder.lm.lm_head.weight"}
    bad = [k for k in missing if k not in tied] + list(unexpected)
    if bad:
        raise DecoderDataError(f"{source}: not a report decoder checkpoint for this config (keys {bad[:5]} ...)")
    objective.decoder.save(folder)

