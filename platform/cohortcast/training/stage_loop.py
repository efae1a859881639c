"""The per-worker loop every stage shares: DeepSpeed engine, data shard, optimizer
steps, metrics on every worker (Ray Train reports are collective), checkpoints every
`checkpoint_every` steps and at the end, resume from the latest checkpoint.

A stage supplies `build_model()` and `loss_fn(engine, batch) -> dict of scalar tensors
with "total"`; everything else is here.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from cohortcast.config.training import StageConfig
from cohortcast.training.checkpoints import restore, save_and_report
from cohortcast.training.deepspeed_setup import choose_precision, deepspeed_config, seed_everything

log = logging.getLogger(__name__)


def run_stage_loop(stage: StageConfig, build_model: Callable[[], torch.nn.Module],
                   loss_fn: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                   dataset_name: str = "train") -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = choose_precision(stage.precision, device)
    if rank == 0:
        log.info("precision %s (%s); ZeRO stage %d on %d worker(s)", precision.name, precision.reason,
                 stage.zero_stage, world)
    seed_everything(stage.seed)  # identical initial weights on every rank
    model = build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(stage, precision, world))
    state = restore(engine) or {}
    epoch = int(state.get("epoch", 0))
    resumed_from = engine.global_steps
    seed_everything(stage.seed + 1000 * rank + engine.global_steps)  # different noise per rank and restart
    shard = ray.train.get_dataset_shard(dataset_name)
    samples, started = 0, time.perf_counter()
    while engine.global_steps < stage.max_steps:
        batches = 0
        for batch in shard.iter_torch_batches(batch_size=stage.micro_batch_size, drop_last=True, device=device):
            batches += 1
            before = engine.global_steps
            terms = loss_fn(engine, batch)
            engine.backward(terms["total"])
            engine.step()
            samples += stage.micro_batch_size
            if engine.global_steps == before:
                continue  # accumulating: no optimizer step yet
            step = engine.global_steps
            if step % stage.log_every and step % stage.checkpoint_every and step < stage.max_steps:
                continue
            elapsed = time.perf_counter() - started
            metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
            metrics.update(step=step, epoch=epoch, lr=float(scheduler.get_last_lr()[0]),
                           samples_per_s=samples * world / max(elapsed, 1e-9), resumed_from=resumed_from)
            if step % stage.checkpoint_every == 0 or step >= stage.max_steps:
                save_and_report(engine, metrics, {"epoch": epoch, "step": step})
            else:
                ray.train.report(metrics)
            if step >= stage.max_steps:
                break
        if batches == 0:
            raise RuntimeError(f"worker {rank} got no full batch of {stage.micro_batch_size} rows: the dataset is "
                               f"smaller than micro_batch_size x workers ({stage.micro_batch_size} x {world})")
        epoch += 1
