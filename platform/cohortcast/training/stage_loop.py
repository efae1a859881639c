"""The per-worker loop every stage shares: DeepSpeed engine, data shard, optimizer
steps, metrics on every worker (Ray Train reports are collective), checkpoints every
`checkpoint_every` steps and at the end, resume from the latest checkpoint, validation
and MLflow logging on world rank 0.

A stage supplies `build_model()` and `loss_fn(engine, batch) -> dict of scalar tensors
with "total"`, and optionally `StageHooks`; everything else is here.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cohortcast.config.training import StageConfig
from cohortcast.training.checkpoints import restore, save_and_report
from cohortcast.training.data_streaming import torch_threads
from cohortcast.training.deepspeed_setup import (
    autocast_like,
    choose_precision,
    deepspeed_config,
    effective_zero_stage,
    seed_everything,
)
from cohortcast.training.progress import StageProgress

log = logging.getLogger(__name__)

# validate(engine, val_batches) -> (scalar metrics, {name: uint8 image}); rank 0 only.
Validate = Callable[[Any, Iterable[dict[str, np.ndarray]]], tuple[dict[str, float], dict[str, np.ndarray]]]


@dataclass
class StageHooks:
    # Numpy batch + this epoch's generator -> model inputs (tensors moved to the device
    # by the loop). Lets a stage draw per-epoch randomness (e.g. CLDM's target date).
    prepare_batch: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, Any]] | None = None
    validate: Validate | None = None
    validate_every_epochs: int = 1
    val_batch_size: int = 16
    tracking: dict[str, str] | None = None  # {"uri", "run_id"} of the stage's MLflow run
    # Keep the best weights by a validation metric (lower is better): world rank 0 writes
    # the module's state to `best_path` (safetensors) whenever validation improves on it;
    # the stage's export then prefers that file to the last checkpoint. ZeRO stages <= 2
    # only (ZeRO-3 partitions the parameters themselves; there the last checkpoint is used).
    best_metric: str | None = None
    best_path: str | None = None
    # A stage that draws each step from several shards (the CLDM encoder: one volume batch
    # and one radiograph batch with their own sizes) gives the epoch's batches itself:
    # (device, this epoch's generator) -> batches of tensors on the device. The loop then
    # reads no `dataset_name` shard; stage.micro_batch_size must be the samples per batch.
    train_batches: Callable[[torch.device, np.random.Generator], Iterable[dict[str, Any]]] | None = None
    # Likewise the validation batches (rank 0) instead of the "val" shard's; None: "val".
    val_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None
    # Validate once before the first step too (not on resume): the curve's start, what a
    # self-supervised loss is judged against (the CLDM encoder's MIM loss).
    validate_at_start: bool = False


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batches(shard, stage: StageConfig, hooks: StageHooks, device, rng: np.random.Generator):
    if hooks.train_batches is not None:
        yield from hooks.train_batches(device, rng)
        return
    if hooks.prepare_batch is None:
        yield from shard.iter_torch_batches(batch_size=stage.micro_batch_size, drop_last=True, device=device)
        return
    for batch in shard.iter_batches(batch_size=stage.micro_batch_size, drop_last=True, batch_format="numpy"):
        yield _to_device(hooks.prepare_batch(batch, rng), device)


def _can_fuse(params: list[torch.nn.Parameter], device: torch.device) -> bool:
    """torch's fused AdamW (one kernel over all tensors) runs on CPU and CUDA for
    floating-point parameters: the optimizer step of the tiny U-Net took 2 ms instead of
    10-11 ms for the default per-tensor loop on CPU (211 tensors, one thread)."""
    return device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)


def _keep_if_best(engine, value: float, best: dict, path: str) -> None:
    """Write the module's weights to `path` when `value` beats the best so far (atomic)."""
    import os

    from safetensors.torch import save_file

    if not np.isfinite(value) or (best["value"] is not None and value >= best["value"]):
        return  # NaN compares False with everything: it would count as an improvement
    best.update(value=float(value), step=int(engine.global_steps))
    # clone: tied weights (a Hugging Face LM's lm_head and input embeddings) share storage,
    # which safetensors refuses to write; one copy per key loads back the same
    state = {k: v.detach().float().cpu().clone().contiguous() for k, v in engine.module.state_dict().items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(state, tmp)
    os.replace(tmp, path)
    log.info("best %s so far (%.4f at step %d): weights kept in %s", "validation", value, best["step"], path)


# Ray Train hears from the loop only at checkpoints (and the last step) unless this is
# set: a report is a collective that cost about a second here, while the metrics reach
# MLflow from world rank 0 every `log_every` steps anyway. runner.run_stage sets it on
# each worker (through `with_report_policy`) for Tune trials, whose schedulers need them.
report_between_checkpoints = False


def with_report_policy(worker_loop: Callable[[dict], None], enabled: bool, config: dict) -> None:
    """Ray Train's loop function: `worker_loop(config)` with the report policy set."""
    global report_between_checkpoints
    report_between_checkpoints = enabled
    worker_loop(config)


def run_stage_loop(
    stage: StageConfig,
    build_model: Callable[[], torch.nn.Module],
    loss_fn: Callable[[Any, dict[str, Any]], dict[str, torch.Tensor]],
    hooks: StageHooks | None = None,
    dataset_name: str = "train",
) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from cohortcast.training.stage_tracker import StageTracker

    hooks = hooks or StageHooks()
    setup_started = time.perf_counter()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = choose_precision(stage.precision, device)
    tracker = StageTracker.for_rank(hooks.tracking, rank)
    if device.type == "cpu":
        # One intra-op thread per CPU this worker reserved (rounded up: a worker may hold
        # 0.75 of a CPU when the rest is left to Ray Data): torch may have been imported
        # before Ray set OMP_NUM_THREADS, and then it would use every core of the node.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(torch_threads(cpus))
    if rank == 0:
        zero = effective_zero_stage(stage.zero_stage, world)
        log.info(
            "precision %s (%s); ZeRO stage %d%s on %d worker(s); %d torch thread(s) per worker",
            precision.name,
            precision.reason,
            zero,
            "" if zero == stage.zero_stage else f" (configured {stage.zero_stage}: nothing to partition on one rank)",
            world,
            torch.get_num_threads(),
        )
    seed_everything(stage.seed)  # identical initial weights on every rank
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=_can_fuse(params, device))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(stage, precision, world)
    )
    state = restore(engine) or {}
    epoch = int(state.get("epoch", 0))
    best = {"value": state.get("best_value"), "step": state.get("best_step")}
    keep_best = bool(hooks.best_metric and hooks.best_path and rank == 0)
    if keep_best and stage.zero_stage == 3:
        log.warning("ZeRO-3 partitions parameters: the best-checkpoint selection is off, the last one is exported")
        keep_best = False
    resumed_from = engine.global_steps
    seed_everything(stage.seed + 1000 * rank + engine.global_steps)  # different noise per rank and restart
    shard = ray.train.get_dataset_shard(dataset_name) if hooks.train_batches is None else None
    val_batches = hooks.val_batches if (hooks.validate and rank == 0) else None
    if hooks.validate and rank == 0 and val_batches is None:
        try:
            val_batches = functools.partial(
                ray.train.get_dataset_shard("val").iter_batches, batch_size=hooks.val_batch_size, batch_format="numpy"
            )
        except KeyError:  # no validation split (e.g. a tiny cohort): validation is skipped
            log.info("no 'val' dataset: validation skipped")

    def validation() -> dict[str, float]:
        if val_batches is None:
            return {}
        engine.eval()
        with torch.no_grad(), autocast_like(engine.module):
            metrics, images = hooks.validate(engine, val_batches())
        engine.train()
        if tracker:
            for name, image in images.items():
                tracker.log_png(image, f"validation/epoch{epoch:03d}_step{engine.global_steps:05d}_{name}.png")
        if keep_best and hooks.best_metric in metrics:
            _keep_if_best(engine, metrics[hooks.best_metric], best, hooks.best_path)
        out = {f"val/{k}": v for k, v in metrics.items()}
        if best["value"] is not None:
            out.update({f"val/best_{hooks.best_metric}": best["value"], "val/best_step": best["step"]})
        return out

    if rank == 0:
        log.info(
            "stage set up in %.1f s (model, DeepSpeed engine, checkpoint restore, data shards)",
            time.perf_counter() - setup_started,
        )
    if hooks.validate_at_start and engine.global_steps == 0:
        start = validation()
        if tracker and start:
            tracker.log_metrics({**start, "epoch": epoch}, 0)
    # samples/s counts from the first batch: the wait for it (the Ray Data stream's start:
    # read tasks scheduled, first blocks read) is a one-off, logged apart as first_batch_s,
    # that would otherwise dominate a short stage's rate.
    samples, asked, started, first_batch_s = 0, time.perf_counter(), None, None
    progress = StageProgress.for_rank(rank, context.get_experiment_name(), stage.max_steps, resumed_from)
    while engine.global_steps < stage.max_steps:
        batches = 0
        rng = np.random.default_rng([stage.seed, epoch, rank])  # fresh draws every epoch
        for batch in _batches(shard, stage, hooks, device, rng):
            batches += 1
            if started is None:
                started = time.perf_counter()
                first_batch_s = started - asked
                if rank == 0:
                    log.info("first batch after %.1f s (data stream start-up)", first_batch_s)
            before = engine.global_steps
            with autocast_like(engine.module):
                terms = loss_fn(engine, batch)
            engine.backward(terms["total"])
            engine.step()
            samples += stage.micro_batch_size
            if engine.global_steps == before:
                continue  # accumulating: no optimizer step yet
            step = engine.global_steps
            final = step >= stage.max_steps
            if step % stage.log_every and step % stage.checkpoint_every and not final:
                continue
            elapsed = time.perf_counter() - started
            metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
            metrics.update(
                step=step,
                epoch=epoch,
                lr=float(scheduler.get_last_lr()[0]),
                samples_per_s=samples * world / max(elapsed, 1e-9),
                first_batch_s=first_batch_s,
                resumed_from=resumed_from,
            )
            if progress and (step % stage.log_every == 0 or final):
                log.info("%s", progress.line(step, metrics["loss/total"], metrics["samples_per_s"], elapsed))
            if final:
                metrics.update(validation())
            if tracker:
                tracker.log_metrics(metrics, step)
            if step % stage.checkpoint_every == 0 or final:
                save_and_report(
                    engine,
                    metrics,
                    {"epoch": epoch, "step": step, "best_value": best["value"], "best_step": best["step"]},
                )
            elif report_between_checkpoints:
                ray.train.report(metrics)  # a sweep's scheduler (ASHA) decides on these
            if final:
                break
        if batches == 0:
            raise RuntimeError(
                f"worker {rank} got no full batch of {stage.micro_batch_size} rows: the dataset is "
                f"smaller than micro_batch_size x workers ({stage.micro_batch_size} x {world})"
            )
        epoch += 1
        if engine.global_steps < stage.max_steps and epoch % hooks.validate_every_epochs == 0:
            val = validation()
            if tracker and val:
                tracker.log_metrics({**val, "epoch": epoch}, engine.global_steps)
