"""Training throughput: the Ray Train + DeepSpeed path vs a plain single-process
PyTorch loop, same model (the stage-c denoiser), micro-batch, steps, loss and AdamW.

    python benchmarks/training_throughput.py [--steps 30] [--batch 8] [--crop 64] [--repeats 3] [--json out.json]

Ray path: `run_stage` + `ldm_unconditional_worker_loop` (ZeRO-2, gloo, fp32 on CPU) on a
Ray Dataset of random latents, with 1 worker on all cores (same global batch as the
plain loop) and one worker per core (data parallel: global batch x workers). samples/s is measured inside the
loop from its first batch (the wait for that batch, the dataset stream's start, is
`first_batch_s`), and end to end (wall clock of `fit()`, start-up included).
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
from pathlib import Path

import numpy as np
import torch

# Seconds to wait after ray.init before timing: a new Ray instance starts its idle worker
# processes (each imports Ray) for several seconds, which slowed a plain loop timed right
# after it by up to a quarter on 2 cores.
SETTLE_S = 15


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
) -> tuple[float, float, float]:
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
    # Lazy, as the stages' datasets are (they stream: training/data_streaming.py).
    dataset = ray.data.from_items([{"latent_d8": np.repeat(x[None], 8, axis=0)} for x in latents])
    started = time.perf_counter()
    result = run_stage(
        f"bench-{workers}w-{time.time_ns()}",
        ldm_unconditional_worker_loop,
        {"stage": stage, "model": model_cfg},
        {"train": dataset},
        ScalingSettings(num_workers=workers, cpus_per_worker=cpus, storage_path=storage, max_failures=0),
    )
    wall = time.perf_counter() - started
    return (
        float(result.metrics["samples_per_s"]),
        steps * batch * workers / wall,
        float(result.metrics["first_batch_s"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64, help="crop size; latents are crop/4 on a side (the tiny VAE)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of plain loop, 1 worker, N workers")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    import ray

    from cohortcast.config.models import ForecasterConfig, VAEConfig

    model_cfg = ForecasterConfig(vae=VAEConfig(sample_size=args.crop))
    side = model_cfg.vae.latent_side
    latents = np.random.default_rng(0).standard_normal((args.steps * args.batch * 2, 4, side, side)).astype(np.float32)
    cpus = os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    time.sleep(SETTLE_S)
    # Rounds of plain, 1 worker, N workers, and a last plain loop: each Ray figure's ratio
    # is against the mean of the plain loops either side of it (this machine's speed drifts
    # by 20-30% within minutes), and the table gives the median and range over rounds.
    plain = [plain_loop(model_cfg, args.steps, args.batch, latents)]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as storage:
        for _ in range(args.repeats):
            # Same cores as the plain loop: one worker with all of them (same global batch),
            # then data parallel with one core per worker (global batch x workers).
            for workers, per_worker in ((1, cpus), (cpus, 1)):
                loop_rate, wall_rate, first_batch = ray_path(
                    model_cfg, args.steps, args.batch, latents, workers, per_worker, storage
                )
                runs.setdefault(f"Ray Train + DeepSpeed ZeRO-2, {workers}w x {per_worker} CPU", []).append(
                    {"loop": loop_rate, "wall": wall_rate, "first_batch_s": first_batch, "round": len(plain) - 1}
                )
            plain.append(plain_loop(model_cfg, args.steps, args.batch, latents))
    for rows in runs.values():
        for row in rows:
            row["ratio"] = row["loop"] / ((plain[row["round"]] + plain[row["round"] + 1]) / 2)
    machine = (
        f"{platform.machine()}, {cpus} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"Ray {ray.__version__}"
    )
    print(json.dumps({"machine": machine, "steps": args.steps, "micro_batch": args.batch, "latent": [4, side, side]}))
    print(f"plain loop samples/s, each round: {', '.join(f'{p:.1f}' for p in plain)}")
    print(
        f"{'path':<46} {'samples/s (loop)':>17} {'ratio (median, range)':>24} {'incl. start-up':>15} {'1st batch s':>12}"
    )
    for name, rows in runs.items():
        ratios = [r["ratio"] for r in rows]
        print(
            f"{name:<46} {np.median([r['loop'] for r in rows]):>17.1f} "
            f"{np.median(ratios):>7.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] "
            f"{np.median([r['wall'] for r in rows]):>15.1f} {np.median([r['first_batch_s'] for r in rows]):>12.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "plain": plain, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
