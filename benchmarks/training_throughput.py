"""Training throughput: the Ray Train + DeepSpeed path vs a plain single-process
PyTorch loop, same model (the stage-c denoiser), micro-batch, steps, loss and AdamW.

    python benchmarks/training_throughput.py [--steps 30] [--batch 8] [--crop 64]

Ray path: `run_stage` + `ldm_unconditional_worker_loop` (ZeRO-2, gloo, fp32 on CPU) on a
Ray Dataset of random latents, with 1 worker on all cores (same global batch as the
plain loop) and one worker per core (data parallel: global batch x workers). samples/s is measured inside the
loop (excluding start-up), and end to end (wall clock of `fit()`, start-up included).
The plain loop uses every core for torch's intra-op threads; each Ray worker gets
`cpus_per_worker` threads (Ray sets OMP_NUM_THREADS from it). Record the output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch


def plain_loop(model_cfg, steps: int, batch: int, latents: np.ndarray) -> float:
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.deepspeed_setup import seed_everything
    from cohortcast.training.ldm_stage import build_denoiser, diffusion_loss

    seed_everything(23)
    model = build_denoiser(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    scheduler = train_scheduler(model_cfg.scheduler)
    data = torch.from_numpy(latents)
    started = time.perf_counter()
    for step in range(steps):
        rows = data[(step * batch) % len(data) :][:batch]
        loss = diffusion_loss(model, scheduler, rows, torch.zeros_like(rows), model.null(batch))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def ray_path(
    model_cfg, steps: int, batch: int, latents: np.ndarray, workers: int, cpus: float, storage: str
) -> tuple[float, float]:
    import ray.data

    from cohortcast.config.training import ScalingSettings, StageConfig
    from cohortcast.training.ldm_stage import ldm_unconditional_worker_loop
    from cohortcast.training.runner import run_stage

    stage = StageConfig(
        max_steps=steps,
        micro_batch_size=batch,
        lr=1e-4,
        warmup_steps=1,
        zero_stage=2,
        checkpoint_every=10**6,
        log_every=steps,
    )
    dataset = ray.data.from_items([{"latent_d8": np.repeat(x[None], 8, axis=0)} for x in latents]).materialize()
    started = time.perf_counter()
    result = run_stage(
        f"bench-{workers}w-{time.time_ns()}",
        ldm_unconditional_worker_loop,
        {"stage": stage, "model": model_cfg},
        {"train": dataset},
        ScalingSettings(num_workers=workers, cpus_per_worker=cpus, storage_path=storage, max_failures=0),
    )
    wall = time.perf_counter() - started
    return float(result.metrics["samples_per_s"]), steps * batch * workers / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64, help="crop size; latents are crop/4 on a side (the tiny VAE)")
    args = parser.parse_args()
    import ray

    from cohortcast.config.models import ForecasterConfig, VAEConfig

    model_cfg = ForecasterConfig(vae=VAEConfig(sample_size=args.crop))
    side = model_cfg.vae.latent_side
    latents = np.random.default_rng(0).standard_normal((args.steps * args.batch * 2, 4, side, side)).astype(np.float32)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = {"plain loop": (plain_loop(model_cfg, args.steps, args.batch, latents), None)}
    with tempfile.TemporaryDirectory() as storage:
        cpus = os.cpu_count()
        # Same cores as the plain loop: one worker with all of them (same global batch),
        # then data parallel with one core per worker (global batch x workers).
        for workers, per_worker in ((1, cpus), (cpus, 1)):
            rows[f"Ray Train + DeepSpeed ZeRO-2, {workers}w x {per_worker} CPU"] = ray_path(
                model_cfg, args.steps, args.batch, latents, workers, per_worker, storage
            )
    base = rows["plain loop"][0]
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
                f"torch {torch.__version__}, Ray {ray.__version__}",
                "steps": args.steps,
                "micro_batch": args.batch,
                "latent": [4, side, side],
            }
        )
    )
    print(f"{'path':<46} {'samples/s (loop)':>17} {'ratio':>7} {'samples/s (incl. start-up)':>27}")
    for name, (loop_rate, wall_rate) in rows.items():
        wall = f"{wall_rate:.1f}" if wall_rate is not None else "-"
        print(f"{name:<46} {loop_rate:>17.1f} {loop_rate / base:>6.2f}x {wall:>27}")


if __name__ == "__main__":
    main()
