"""CLDM stages `diffusion` and `regressor` (paper Sec. 3, Eq. 1): the forecaster (temporal
transformer + token denoiser) on trajectories of study latents, through the frozen
decoders, on Ray Train + DeepSpeed via the shared stage loop.

Every optimizer step takes, per worker, `micro_batch_3d` CT trajectories and
`micro_batch_2d` radiograph trajectories of its shard. Each epoch draws a fresh target
exam per trajectory among its follow-ups (CLDM: "we randomly pick a future time d_next
for each patient") and, with `truncate_priors`, keeps its k most recent priors, k
uniform in 1..n, so forecasts from 1, 3 and all priors are all in distribution.

Loss = sum over kinds of L_diff + task_weight * L_task:
- L_diff: the forecaster's own `loss` (v-prediction MSE on the scaled change from the
  last prior, CFG drops; the regressor's one-pass MSE).
- L_task on the predicted clean target tokens: CT, the frozen segmentation decoder's
  Dice + BCE against the target's mask; radiographs, the frozen report decoder's token
  cross-entropy of the target's report given the last prior's tokens. Per row weighted by
  a_t ("alpha_bar": at large t the clean estimate is mostly noise) or uniformly; the
  regressor's prediction is always weighted 1 (it has no noise level).

An epoch is one pass over the CT trajectories (the radiographs' when there are none); the
other kind's stream restarts when it runs out, as in the encoder stage."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cohortcast.training.study_trajectories import (
    StudyTrajectories,
    draw_examples,
    epoch_batches,
    examples_for,
    load_trajectories,
    prior_tokens,
)

log = logging.getLogger(__name__)

KINDS = (3, 2)


def per_row_dice_bce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sigmoid Dice loss + BCE per row (MONAI DiceCELoss's terms, kept per row so they
    can be weighted by the noise level); logits (B, 1, *grid), mask (B, *grid) 0/1."""
    target = mask.unsqueeze(1).to(logits.dtype)
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, logits.dim()))
    dice = 1.0 - (2.0 * (prob * target).sum(dims) + 1e-5) / (prob.sum(dims) + target.sum(dims) + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    return dice + bce


class CLDMObjective(nn.Module):
    """The DeepSpeed engine's module: the trained forecaster and the frozen decoders; its
    forward is the stage's loss terms."""

    def __init__(
        self,
        forecaster,
        segmentation=None,
        report=None,
        task_weight: float = 1.0,
        task_weighting: str = "alpha_bar",
    ):
        super().__init__()
        self.forecaster = forecaster
        self.segmentation, self.report = segmentation, report
        for decoder in (segmentation, report):
            if decoder is not None:
                decoder.requires_grad_(False).eval()
        self.task_weight, self.task_weighting = task_weight, task_weighting
        sched = forecaster._train_scheduler
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        for decoder in (self.segmentation, self.report):
            if decoder is not None:
                decoder.eval()  # frozen: no dropout, GroupNorm/LayerNorm as trained
        return self

    def _weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.task_weighting == "uniform" or self.forecaster.KIND == "study_regressor":
            return torch.ones(timesteps.shape, device=timesteps.device)
        return self.alphas_cumprod.to(timesteps.device)[timesteps.to(self.alphas_cumprod.device)]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = None
        for dims in KINDS:
            key = f"target_{dims}d"
            if key not in batch:
                continue
            out = self.forecaster.loss(
                batch[f"priors_{dims}d"], batch[f"days_{dims}d"], batch[f"exam_mask_{dims}d"], batch[key]
            )
            terms[f"diffusion_{dims}d"] = out.loss
            part = out.loss
            task = self._task(dims, out.predicted, batch, out.timesteps)
            if task is not None:
                terms[f"task_{dims}d"] = task
                part = part + self.task_weight * task
            total = part if total is None else total + part
        if total is None:
            raise ValueError("a CLDM batch needs CT or radiograph examples")
        terms["total"] = total
        return terms

    def _task(self, dims: int, predicted: torch.Tensor, batch: dict, timesteps: torch.Tensor):
        if self.task_weight == 0:
            return None
        weight = self._weights(timesteps)
        if dims == 3 and self.segmentation is not None:
            dtype = next(self.segmentation.parameters()).dtype
            per_row = per_row_dice_bce(self.segmentation(predicted.to(dtype)).float(), batch["target_mask_3d"])
        elif dims == 2 and self.report is not None:
            dtype = next(self.report.parameters()).dtype
            per_row = self.report.loss(
                predicted.to(dtype), batch["reports_2d"], prior=batch["last_prior_2d"].to(dtype), reduction="none"
            ).float()
        else:
            return None
        return (per_row * weight).mean()


def example_tensors(trajectories: StudyTrajectories, examples, max_priors: int) -> dict[str, Any]:
    """Model inputs of one kind for `examples` (suffix `_{dims}d`)."""
    d = trajectories.dims
    out = {
        f"priors_{d}d": torch.from_numpy(prior_tokens(trajectories, examples)),  # (B, K, 1 + N, dim)
        f"days_{d}d": torch.from_numpy(examples.days_before_target),  # (B, K)
        f"exam_mask_{d}d": torch.from_numpy(examples.exam_mask),  # (B, K)
        f"target_{d}d": torch.from_numpy(trajectories.tokens[examples.target_row]),  # (B, 1 + N, dim)
    }
    if d == 3 and trajectories.masks is not None:
        out["target_mask_3d"] = torch.from_numpy(trajectories.masks[examples.target_row])  # (B, D, H, W)
    if d == 2:
        out["reports_2d"] = [trajectories.reports[r] for r in examples.target_row]
        out["last_prior_2d"] = torch.from_numpy(trajectories.tokens[examples.last_prior_row])
    return out


def training_batches(
    shards: dict[int, StudyTrajectories],
    sizes: dict[int, int],
    rng: np.random.Generator,
    max_priors: int,
    truncate: bool,
) -> Iterator[dict[str, Any]]:
    """One epoch of steps: each a batch per kind (sizes[dims] trajectories, fresh targets).
    The epoch follows the CT stream (radiographs when there is no CT); the other restarts."""
    kinds = [d for d in KINDS if sizes.get(d, 0) > 0 and shards.get(d) is not None and len(shards[d])]
    if not kinds:
        return
    lead, others = kinds[0], kinds[1:]

    def stream(dims: int) -> Iterator[np.ndarray]:
        while True:
            yielded = False
            for idx in epoch_batches(len(shards[dims]), sizes[dims], rng):
                yielded = True
                yield idx
            if not yielded:
                return

    followers = {d: stream(d) for d in others}
    for idx in epoch_batches(len(shards[lead]), sizes[lead], rng):
        batch = example_tensors(shards[lead], draw_examples(shards[lead], idx, rng, max_priors, truncate), max_priors)
        for d, it in followers.items():
            other = next(it, None)
            if other is not None:
                batch.update(
                    example_tensors(shards[d], draw_examples(shards[d], other, rng, max_priors, truncate), max_priors)
                )
        yield batch


def validation_cases(trajectories: StudyTrajectories, max_priors: int, limit: int):
    """The last exam of each trajectory (CT: with a mask) from all its priors, up to `limit`."""
    picks = []
    for i, n in enumerate(trajectories.num_exams):
        last = trajectories.offsets[i] + n - 1
        if n >= 2 and (trajectories.dims != 3 or trajectories.has_mask[last]):
            picks.append((i, int(n - 1)))
    picks = picks[:limit]
    return examples_for(trajectories, picks, max_priors) if picks else None


def mask_avd(pred: np.ndarray, true: np.ndarray, lung_voxels: np.ndarray) -> np.ndarray:
    """(B,) |V_pred - V_true| / V_lung with volumes as voxel counts on one grid."""
    vp = pred.reshape(len(pred), -1).sum(1).astype(np.float64)
    vt = true.reshape(len(true), -1).sum(1).astype(np.float64)
    return np.abs(vp - vt) / np.maximum(lung_voxels, 1)


def mask_dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p, t = pred.reshape(len(pred), -1).astype(bool), true.reshape(len(true), -1).astype(bool)
    denom = p.sum(1) + t.sum(1)
    return np.where(denom > 0, 2.0 * (p & t).sum(1) / np.maximum(denom, 1), 1.0)


def validate_forecasts(objective: CLDMObjective, val: dict[int, StudyTrajectories], cfg, max_priors: int):
    """Rank-0 validation: the val CT cases' mean-forecast masks (aVD, Dice) next to
    copy-last's and the decoder's on the true target (the bound), and each kind's latent
    error of the mean forecast next to no-change's."""
    forecaster = objective.forecaster
    device = next(forecaster.parameters()).device
    metrics: dict[str, float] = {}
    for dims, trajectories in val.items():
        examples = validation_cases(trajectories, max_priors, cfg.max_cases) if trajectories is not None else None
        if examples is None:
            continue
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in example_tensors(trajectories, examples, max_priors).items()}
        ids = [f"{trajectories.patients[t]}/{r}" for t, r in zip(examples.trajectory, examples.target_row)]
        forecast = forecaster.forecast(
            inputs[f"priors_{dims}d"],
            inputs[f"days_{dims}d"],
            inputs[f"exam_mask_{dims}d"],
            ids,
            num_samples=cfg.samples,
            seed=cfg.seed,
            steps=cfg.inference_steps,
        )
        target = inputs[f"target_{dims}d"].float()
        metrics[f"latent_error_{dims}d"] = float((forecast.mean.float() - target).abs().mean())
        metrics[f"no_change_latent_error_{dims}d"] = float((forecast.baseline.float() - target).abs().mean())
        if dims == 3 and objective.segmentation is not None and trajectories.masks is not None:
            seg = objective.segmentation
            dtype = next(seg.parameters()).dtype
            b, s = forecast.samples.shape[:2]
            probs = torch.sigmoid(seg(forecast.samples.flatten(0, 1).to(dtype)).float()).reshape(b, s, -1)
            pred = (probs.mean(1) >= 0.5).cpu().numpy()
            bound = (torch.sigmoid(seg(target.to(dtype)).float()) >= 0.5).flatten(1).cpu().numpy()
            true = trajectories.masks[examples.target_row].reshape(b, -1)
            last = trajectories.masks[examples.last_prior_row].reshape(b, -1)
            lung = trajectories.lung_voxels[examples.target_row]
            metrics.update(
                avd=float(mask_avd(pred, true, lung).mean()),
                dice=float(mask_dice(pred, true).mean()),
                copy_last_avd=float(mask_avd(last, true, lung).mean()),
                copy_last_dice=float(mask_dice(last, true).mean()),
                bound_avd=float(mask_avd(bound, true, lung).mean()),
                cases_3d=float(b),
            )
    return metrics, {}


def fit_target_scales(models_cfg, train: dict[int, StudyTrajectories]) -> None:
    """Set `denoiser.target_scale_{2,3}d` = 1 / std of the generated quantity over every
    consecutive exam pair of the training trajectories (all workers get the same value)."""
    from cohortcast.models.cldm_forecaster import CLDMForecaster

    probe = CLDMForecaster(models_cfg)
    for dims, trajectories in train.items():
        if trajectories is None or not len(trajectories.with_follow_up()):
            continue
        rows = [(r, r + 1) for i in range(len(trajectories)) for r in trajectories.rows_of(i)[:-1]]
        prev, nxt = (np.asarray(x) for x in zip(*rows))
        scale = probe.fit_target_scale(
            torch.from_numpy(trajectories.tokens[nxt]), torch.from_numpy(trajectories.tokens[prev])
        )
        setattr(models_cfg.denoiser, f"target_scale_{dims}d", scale)
        log.info("CLDM %dD target scale %.4g (1 / std over %d exam pairs)", dims, scale, len(rows))


def load_split(cache: str, ingested: str, split: str, models_cfg) -> dict[int, StudyTrajectories]:
    out = {}
    for dims in models_cfg.latent.dims:
        trajectories = load_trajectories(cache, split, dims, ingested if dims == 3 else None)
        out[dims] = trajectories.with_follow_up() if trajectories is not None else None
    return out


def build_objective(config: dict) -> CLDMObjective:
    from cohortcast.models.cldm_forecaster import CLDMForecaster
    from cohortcast.models.report_decoder import ReportDecoder
    from cohortcast.models.segmentation_decoder import SegmentationDecoder
    from cohortcast.models.study_regressor import StudyRegressor

    models_cfg, stage = config["models"], config["stage"]
    forecaster = (StudyRegressor if config["kind"] == "regressor" else CLDMForecaster)(models_cfg)
    seg = SegmentationDecoder.load(config["segmentation"]) if config.get("segmentation") else None
    report = ReportDecoder.load(config["report"]) if config.get("report") else None
    return CLDMObjective(forecaster, seg, report, stage.task_weight, stage.task_weighting)


def cldm_diffusion_worker_loop(config: dict) -> None:
    """Ray Train loop; config: kind ("diffusion" | "regressor"), stage
    (DiffusionStageConfig), models (CLDMModelsConfig with fitted target scales), cache,
    ingested, segmentation / report (decoder folders or None), validation
    (ForecastValidationConfig), tracking, best_path."""
    import ray.train

    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    stage, models_cfg, val_cfg = config["stage"], config["models"], config["validation"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    train = load_split(config["cache"], config["ingested"], "train", models_cfg)
    shards = {d: t.shard(rank, world) if t is not None else None for d, t in train.items()}
    sizes = {3: stage.micro_batch_3d, 2: stage.micro_batch_2d}
    for d, shard in shards.items():
        if sizes.get(d) and shard is not None and len(shard) < sizes[d]:
            raise ValueError(
                f"worker {rank} has {len(shard)} {d}D trajectories, fewer than micro_batch_{d}d={sizes[d]}: "
                f"lower cldm.training.{config['kind']}.micro_batch_{d}d or the workers"
            )
    max_priors = models_cfg.temporal.max_exams
    val = load_split(config["cache"], config["ingested"], "val", models_cfg) if rank == 0 else {}

    def batches(device, rng):
        for batch in training_batches(shards, sizes, rng, max_priors, stage.truncate_priors):
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    has_val = any(t is not None and len(t) for t in val.values())
    hooks = StageHooks(
        train_batches=batches,
        validate=(lambda engine, _: validate_forecasts(engine.module, val, val_cfg, max_priors)) if has_val else None,
        val_batches=(lambda: iter(())) if has_val else None,
        validate_every_epochs=val_cfg.every_epochs,
        tracking=config.get("tracking"),
        best_metric="avd" if config.get("segmentation") else None,
        best_path=config.get("best_path"),
        validate_at_start=True,
    )
    # The loop counts samples and sizes DeepSpeed's micro-batch from micro_batch_size:
    # here the step's trajectories, both kinds.
    step_stage = dataclasses.replace(stage, micro_batch_size=sum(n for d, n in sizes.items() if shards.get(d)))
    run_stage_loop(step_stage, lambda: build_objective(config), lambda engine, batch: engine(batch), hooks)


def export_forecaster(kind: str, models_cfg, source, folder) -> None:
    """The trained forecaster (or regressor) out of the objective's weights: the last
    checkpoint's consolidated state or the kept best validation weights."""
    from cohortcast.models.cldm_forecaster import CLDMForecaster
    from cohortcast.models.study_regressor import StudyRegressor
    from cohortcast.training.export import consolidated_state_dict

    model = (StudyRegressor if kind == "regressor" else CLDMForecaster)(models_cfg)
    state = consolidated_state_dict(source)
    prefix = "forecaster."
    model.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    model.save(folder)
