"""Where a one-worker Ray Train + DeepSpeed run loses throughput against a plain PyTorch
loop: the same steps timed layer by layer, inside one Ray Train worker, in one run.

    python benchmarks/training_overhead.py [--steps 120] [--batch 8] [--crop 64] [--env KEY=VALUE] [--json out.json]

Rows (stage-c denoiser, debug config, AdamW, clipping 1.0, random 4 x crop/4 x crop/4 latents, as benchmarks/training_throughput.py):
- plain loop, driver process: the baseline (torch threads = the machine's CPUs), before
  ray.init, then with Ray up and idle before and after the Ray rows (their mean is the
  ratios' base);
- plain loop, in the worker: the same loop in the Ray Train worker process (its thread
  count, Ray's own threads beside it);
- DeepSpeed ZeRO-0/1/2, in-memory batches: `deepspeed.initialize` with the stage's
  config (deepspeed_setup.deepspeed_config), engine.backward / engine.step;
- DeepSpeed ZeRO-2 + Ray Data shard: batches from `get_dataset_shard("train")` as the
  stage draws them (iter_batches + random_orientation), timed from the first batch, and
  the wait for that first batch (the stream's start-up) apart;
- the stage loop: `run_stage` + `ldm_unconditional_worker_loop` as the jobs run it (its
  `samples_per_s`, from the first batch on; configured ZeRO-2, which one worker runs as
  ZeRO-1).

Each worker variant runs `--steps` steps after 5 warm-up steps, in `--rounds` interleaved
rounds (median and range; each round also against its own in-worker plain loop). `--env` sets environment
variables of the workers (ray.init's runtime_env). Record the output in
benchmarks/RESULTS.md.
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

WARMUP = 5
# Seconds to wait after ray.init before timing: a new Ray instance starts its idle worker
# processes (each imports Ray) for several seconds, which took a quarter off a plain loop
# timed right after it on 2 cores.
SETTLE_S = 15


def _plain_steps(model, optimizer, scheduler, rows_of, steps: int) -> float:
    from cohortcast.training.ldm_stage import diffusion_loss

    started = None
    for step in range(WARMUP + steps):
        if step == WARMUP:
            started = time.perf_counter()
        rows = rows_of(step)
        loss = diffusion_loss(model, scheduler, rows, torch.zeros_like(rows), model.null(rows.shape[0]))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return steps * rows.shape[0] / (time.perf_counter() - started)


def plain_loop(model_cfg, steps: int, latents: np.ndarray, batch: int) -> float:
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.deepspeed_setup import seed_everything
    from cohortcast.training.ldm_stage import build_denoiser

    seed_everything(23)
    model = build_denoiser(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = torch.from_numpy(latents)
    return _plain_steps(
        model, optimizer, train_scheduler(model_cfg.scheduler), lambda s: data[(s * batch) % len(data) :][:batch], steps
    )


def _engine(model_cfg, stage):
    import deepspeed

    from cohortcast.training.deepspeed_setup import choose_precision, deepspeed_config, seed_everything
    from cohortcast.training.ldm_stage import build_denoiser

    seed_everything(23)
    model = build_denoiser(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    # World size 2 in the config keeps the requested ZeRO stage (on one rank the stages
    # run ZeRO-2 as ZeRO-1: deepspeed_setup.effective_zero_stage), the batch that of one.
    config = deepspeed_config(stage, choose_precision("fp32", torch.device("cpu")), 2)
    config["train_batch_size"] = stage.micro_batch_size
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _engine_steps(engine, scheduler, batches, steps: int, batch: int) -> tuple[float, float]:
    """samples/s from the first timed step on, and the wait for the first batch."""
    from cohortcast.training.ldm_stage import unconditional_loss

    asked = time.perf_counter()
    first_wait, started = None, None
    for step, rows in enumerate(batches):
        if first_wait is None:
            first_wait = time.perf_counter() - asked
        if step == WARMUP:
            started = time.perf_counter()
        if step == WARMUP + steps:
            break
        engine.backward(unconditional_loss(engine, scheduler, rows))
        engine.step()
    return steps * batch / (time.perf_counter() - started), first_wait


def attribution_loop(config: dict) -> None:
    """Ray Train loop: every worker-side variant, one after the other, in this process."""
    import ray
    import ray.train

    from cohortcast.config.training import StageConfig
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.data_streaming import torch_threads
    from cohortcast.training.ldm_stage import random_orientation

    model_cfg, steps, batch = config["model"], config["steps"], config["batch"]
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(torch_threads(cpus))  # what run_stage_loop does
    data = torch.from_numpy(config["latents"])
    scheduler = train_scheduler(model_cfg.scheduler)
    out = {"worker_cpus": cpus, "torch_threads": torch.get_num_threads()}
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng(0)

    def in_memory():
        step = 0
        while True:
            yield data[(step * batch) % len(data) :][:batch]
            step += 1

    def from_shard():
        while True:  # epochs, as the stage loop does
            for rows in shard.iter_batches(batch_size=batch, drop_last=True, batch_format="numpy"):
                yield random_orientation(rows, rng)["latent"]

    def stage(zero):
        return StageConfig(max_steps=10**6, micro_batch_size=batch, lr=1e-4, warmup_steps=1, zero_stage=zero)

    shard_batches = from_shard()  # one stream for all rounds: a shard's epoch must run out
    # Rounds of every variant, interleaved: this machine's speed drifts by 20-30% within
    # minutes, so each variant is compared with the plain loop of its own round.
    for _ in range(config["rounds"]):
        rates = {"plain loop, in the worker": plain_loop(model_cfg, steps, config["latents"], batch)}
        for zero in (0, 1, 2):
            rates[f"DeepSpeed ZeRO-{zero}, in-memory batches"] = _engine_steps(
                _engine(model_cfg, stage(zero)), scheduler, in_memory(), steps, batch
            )[0]
        rate, wait = _engine_steps(_engine(model_cfg, stage(2)), scheduler, shard_batches, steps, batch)
        rates["DeepSpeed ZeRO-2 + Ray Data shard"] = rate
        out.setdefault("first batch wait s", wait)
        for name, rate in rates.items():
            out.setdefault(name, []).append(rate)
    # A file, not ray.train.report: a report without a checkpoint leaves no metrics on
    # the Result (Train V2), and the worker runs on this machine.
    with open(config["out"], "w") as f:
        json.dump(out, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64, help="crop size; latents are crop/4 on a side (the tiny VAE)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the in-worker variants, interleaved")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the workers (repeatable)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import ray
    import ray.data

    from cohortcast.config.models import ForecasterConfig, VAEConfig
    from cohortcast.config.training import ScalingSettings, StageConfig
    from cohortcast.training.ldm_stage import ldm_unconditional_worker_loop
    from cohortcast.training.runner import run_stage

    env = dict(kv.split("=", 1) for kv in args.env)
    model_cfg = ForecasterConfig(vae=VAEConfig(sample_size=args.crop))
    side = model_cfg.vae.latent_side
    rows = (WARMUP + args.steps) * args.batch * 2
    latents = np.random.default_rng(0).standard_normal((rows, 4, side, side)).astype(np.float32)
    cpus = os.cpu_count()
    figures = {"plain loop, driver process, before ray.init": plain_loop(model_cfg, args.steps, latents, args.batch)}
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    time.sleep(SETTLE_S)
    dataset = ray.data.from_items([{"latent_d8": np.repeat(x[None], 8, axis=0)} for x in latents])
    scaling = ScalingSettings(num_workers=1, cpus_per_worker=cpus, max_failures=0)
    figures["plain loop, driver process"] = plain_loop(model_cfg, args.steps, latents, args.batch)
    with tempfile.TemporaryDirectory() as storage:
        scaling.storage_path = storage
        result = run_stage(
            f"attribution-{time.time_ns()}",
            attribution_loop,
            {
                "model": model_cfg,
                "steps": args.steps,
                "batch": args.batch,
                "latents": latents,
                "rounds": args.rounds,
                "out": os.path.join(storage, "attribution.json"),
            },
            {"train": dataset},
            scaling,
        )
        if result.error is not None:
            raise result.error
        with open(os.path.join(storage, "attribution.json")) as f:
            figures.update(json.load(f))
        stage = StageConfig(
            max_steps=WARMUP + args.steps,
            micro_batch_size=args.batch,
            lr=1e-4,
            warmup_steps=1,
            zero_stage=2,
            checkpoint_every=10**6,
            log_every=10**6,
        )
        result = run_stage(
            f"stage-{time.time_ns()}",
            ldm_unconditional_worker_loop,
            {"stage": stage, "model": model_cfg},
            {"train": dataset},
            scaling,
        )
        if result.error is not None:
            raise result.error
        figures["stage loop (run_stage), from its first batch"] = float(result.metrics["samples_per_s"])
    figures["plain loop, driver process (again)"] = plain_loop(model_cfg, args.steps, latents, args.batch)
    # The baseline: the plain loop with Ray up and idle, the mean of before and after.
    base = (figures["plain loop, driver process"] + figures["plain loop, driver process (again)"]) / 2
    header = {
        "machine": f"{platform.machine()}, {cpus} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"Ray {ray.__version__}",
        "steps": args.steps,
        "micro_batch": args.batch,
        "latent": [4, side, side],
        "worker_env": env,
        "worker_cpus": figures.pop("worker_cpus"),
        "worker_torch_threads": figures.pop("torch_threads"),
        "first_batch_wait_s": round(figures.pop("first batch wait s"), 2),
    }
    print(json.dumps(header))
    in_worker = np.asarray(figures["plain loop, in the worker"])
    print(f"{'variant':<50} {'samples/s (median, range)':>26} {'vs driver plain':>16} {'vs worker plain':>16}")
    for name, rate in figures.items():
        rates = np.atleast_1d(np.asarray(rate, float))
        spread = f" [{rates.min():.0f}-{rates.max():.0f}]" if rates.size > 1 else ""
        # per round against the same round's in-worker plain loop
        vs_worker = f"{np.median(rates / in_worker):.2f}x" if rates.size == in_worker.size > 1 else "-"
        print(f"{name:<50} {np.median(rates):>13.1f}{spread:<13} {np.median(rates) / base:>15.2f}x {vs_worker:>16}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "samples_per_s": figures}, f, indent=2, default=float)


if __name__ == "__main__":
    main()
