"""Batched multi-sample DDIM vs a per-sample loop: same U-Net, steps and seeds, one run.

    python benchmarks/ddim_batching.py [--samples 20] [--steps 50] [--repeats 2]

Both paths call cohortcast.models.sampler (the batched one as the Forecaster does,
in fixed micro-batches of N; the loop one sample at a time). Peak memory is measured in
separate child processes: RSS high-water mark during the forecast minus RSS before it.
Record the output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch


def _setup(crop: int):
    from cohortcast.config.models import DenoiserConfig, ForecasterConfig, VAEConfig
    from cohortcast.models.forecaster import Forecaster

    torch.manual_seed(0)
    # untrained: unit scales stand in for the ones training computes
    model = Forecaster(
        ForecasterConfig(vae=VAEConfig(sample_size=crop, scaling_factor=1.0), denoiser=DenoiserConfig(change_scale=1.0))
    ).eval()
    baseline = torch.randn(1, *model.latent_shape)
    context = torch.randn(1, 3, model.cfg.denoiser.cross_attention_dim)
    return model, baseline, context


def run(mode: str, samples: int, steps: int, crop: int) -> float:
    from cohortcast.models.sampler import forecast_latents

    model, baseline, context = _setup(crop)
    scheduler = model.inference_scheduler()
    start = time.perf_counter()
    if mode == "batched":
        out = forecast_latents(
            model.denoiser, scheduler, baseline, context, ["case"], samples, 0, steps, micro_batch=samples
        ).samples[0]
    else:
        # Sample k alone: its own case id and seed, batch of one, the same loop.
        out = torch.cat(
            [
                forecast_latents(model.denoiser, scheduler, baseline, context, [f"case-{k}"], 1, 0, steps).samples[0]
                for k in range(samples)
            ]
        )
    elapsed = time.perf_counter() - start
    assert out.shape[0] == samples
    return elapsed


def _status(field: str) -> float:
    """A VmRSS/VmHWM line of /proc/self/status, in MiB."""
    with open("/proc/self/status") as fh:
        line = next(row for row in fh if row.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child_memory(mode: str, samples: int, steps: int, crop: int) -> float:
    """In a fresh process: peak RSS growth (MiB) of one forecast beyond the built model.
    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) after set-up (Linux)."""
    code = (
        f"import gc, benchmarks.ddim_batching as b; b._setup({crop}); b.run('batched', 1, 1, {crop}); gc.collect(); "
        f"before = b._status('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); "
        f"b.run('{mode}', {samples}, {steps}, {crop}); print(b._status('VmHWM') - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20, help="samples per case (N)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each path (best is reported)")
    parser.add_argument("--crop", type=int, default=64, help="crop size in pixels (latent side = crop / 8)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model, _, _ = _setup(args.crop)
    params = sum(p.numel() for p in model.denoiser.parameters())
    run("batched", 2, 2, args.crop)  # warm-up
    best = {}
    for mode in ("loop", "batched"):
        best[mode] = min(run(mode, args.samples, args.steps, args.crop) for _ in range(args.repeats))
    memory = {mode: child_memory(mode, args.samples, args.steps, args.crop) for mode in ("loop", "batched")}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    side = args.crop // 8
    print(
        f"denoiser: tiny UNet2DConditionModel, {params / 1e6:.2f} M params, latents 4x{side}x{side}; "
        f"N={args.samples}, {args.steps} DDIM steps"
    )
    for mode in ("loop", "batched"):
        print(
            f"{mode:>8}: {best[mode]:7.2f} s  {args.samples / best[mode]:6.2f} samples/s  "
            f"peak RSS growth {memory[mode]:.1f} MiB ({memory[mode] / args.samples:.2f} MiB/sample)"
        )
    print(f"speed-up batched / loop: {best['loop'] / best['batched']:.2f}x")
    print(json.dumps({"best_s": best, "memory": memory}))


if __name__ == "__main__":
    main()
