"""Training throughput of the SD1.5-sized U-Net with DeepSpeed ZeRO-2 on one device (issue 17 item 5).

    python benchmarks/gpu_training.py --json gpu_training.json             # sd15, bf16, 64 px (8x8 latents)
    python benchmarks/gpu_training.py --crop 64 128 --json gpu_training.json # and 16x16 latents
    python benchmarks/gpu_training.py --smoke --json /tmp/smoke.json        # debug sizes on CPU, seconds
    python benchmarks/gpu_training.py --count-only --crop 64 128 --json /tmp/flops.json  # FLOPs only

The model is the stage-c/d denoiser (training.ldm_stage.build_denoiser: diffusers
UNet2DConditionModel, 8 input channels = noisy + baseline latent, cross-attention to 3
context tokens) of the `sd15` flavour (320/640/1280/1280 channels, 860 M parameters),
randomly initialised, attention through AttnProcessor2_0 (torch SDPA). Channels-last can
only come from the inputs here: DeepSpeed needs the weights contiguous, and diffusers'
transformer blocks hand back contiguous (NCHW) maps, so past the first attention block
the U-Net runs NCHW whatever the inputs (the JSON's activations_channels_last: the
layout of the last conv's output). It trains as the stage loop does
(training/stage_loop.py): one process, deepspeed.initialize with a torch AdamW (fused on
CPU and CUDA) and the job's DeepSpeed
config (training/deepspeed_setup.py: ZeRO stage 2, bf16, clipping 1.0, WarmupCosineLR),
the loss under autocast to the weights' dtype, engine.backward + engine.step; the batch
is random latents, baselines and contexts already on the device (no data loading). The
process group is world size 1: gloo on CPU, NCCL on CUDA.

For each crop size (latent side = crop / 8 for sd15): `--warmup` untimed steps (the first
counted with torch.utils.flop_counter.FlopCounterMode: forward + backward matmul, conv and
SDPA FLOPs), then `--steps` timed steps (CUDA synchronised). Reported: samples/s, peak
memory over the timed steps (torch.cuda.max_memory_allocated; peak RSS on CPU) and
achieved TFLOP/s against the device's dense bf16 peak (H100 SXM / H200 989, A100 312;
null when not in the table).

`--smoke` runs the same code on the `debug` flavour (32 px crops, 8x8 latents), micro-batch
4, 2 + 3 steps, on the CPU. `--count-only` counts one step's FLOPs on the meta device with
a plain forward + backward (no DeepSpeed, no memory, no compute) and times nothing.
Record GPU output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import time

import torch

try:  # run as a script: benchmarks/ is sys.path[0]
    import gpu_common as common
except ImportError:  # python -m benchmarks.gpu_training
    from benchmarks import gpu_common as common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_training.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: cuda:0 if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=sorted(common.DTYPES),
        default="bf16",
        help="DeepSpeed precision: bf16 (default; bf16 weights, fp32 master copy) or fp32",
    )
    parser.add_argument(
        "--crop",
        type=int,
        nargs="+",
        help="crop size(s) in px, measured in turn (default 64 = 8x8 latents; 128 = 16x16; 32 for --smoke)",
    )
    parser.add_argument("--batch", type=int, help="micro-batch per step (default 32; 4 for --smoke)")
    parser.add_argument("--steps", type=int, help="timed steps per crop size (default 20; 3 for --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed steps per crop size first (default 3; 2 for --smoke)")
    parser.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2, 3), default=2, help="DeepSpeed ZeRO stage (default 2, the jobs')"
    )
    parser.add_argument(
        "--memory-format",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="layout of the input latents (default channels_last; DeepSpeed keeps the weights contiguous)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="debug flavour, micro-batch 4, 2 + 3 steps, CPU")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="count one step's FLOPs on the meta device (any machine, seconds); no DeepSpeed, no timing",
    )
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    small = args.smoke
    defaults = {"crop": [32] if small else [64], "batch": 4 if small else 32, "steps": 3 if small else 20}
    defaults["warmup"] = 2 if small else 3
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke and args.device is None:
        args.device = "cpu"
    if args.count_only:
        args.device = "meta"
    if args.batch < 1 or args.steps < 1 or args.warmup < 1 or min(args.crop) < 1:
        parser.error("--batch, --steps, --warmup (the first warm-up step is the counted one) and --crop must be >= 1")
    factor = 4 if small else 8  # the debug VAE halves twice, SD1.5's three times
    if any(crop % factor for crop in args.crop):
        parser.error(f"every --crop must be a multiple of {factor} (the VAE's downsampling)")
    return args


def model_config(args):
    from cohortcast.config.presets import flavor

    return flavor("debug" if args.smoke else "sd15")


def build(cfg, args, device: torch.device):
    from cohortcast.training.deepspeed_setup import seed_everything
    from cohortcast.training.ldm_stage import build_denoiser

    seed_everything(23)
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = build_denoiser(cfg)
    processors = common.use_sdpa(model)
    # Weights stay contiguous: DeepSpeed broadcasts and flattens them as plain buffers (a
    # channels_last weight fails its uint8 view, and converting after initialize would cut
    # the parameters loose from ZeRO's flat partitions). Channels-last comes from the inputs.
    return model.to(device), processors


def make_batch(cfg, crop: int, batch: int, device: torch.device, seed: int, memory_format) -> dict:
    """Random fp32 latents, baselines and contexts on the device, as a stage's batches arrive."""
    side = crop // cfg.vae.downsample_factor
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.vae.latent_channels, side, side)
    return {
        "latents": torch.randn(shape, generator=gen).to(device, memory_format=memory_format),
        "baseline": torch.randn(shape, generator=gen).to(device, memory_format=memory_format),
        "context": torch.randn(batch, 3, cfg.denoiser.cross_attention_dim, generator=gen).to(device),
    }


def loss(model, scheduler, batch: dict) -> torch.Tensor:
    from cohortcast.training.ldm_stage import diffusion_loss

    return diffusion_loss(model, scheduler, batch["latents"], batch["baseline"], batch["context"])


def count_only(cfg, args, device: torch.device) -> dict:
    from cohortcast.models.schedulers import train_scheduler

    model, processors = build(cfg, args, device)
    scheduler = train_scheduler(cfg.scheduler)
    rows = {}
    for crop in args.crop:
        batch = make_batch(cfg, crop, args.batch, device, 0, memory_format(args))
        flops, _ = common.count_flops(lambda b=batch: loss(model, scheduler, b).backward())
        rows[str(crop)] = per_crop_shapes(cfg, crop, args) | {
            "flops_per_step": flops,
            "flops_per_sample": flops / args.batch,
        }
    return {"attention_processors": processors, "crops": rows}


def memory_format(args) -> torch.memory_format:
    return torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format


def per_crop_shapes(cfg, crop: int, args) -> dict:
    side = crop // cfg.vae.downsample_factor
    return {"crop": crop, "latent": [cfg.vae.latent_channels, side, side], "micro_batch": args.batch}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device) -> str:
    """World size 1, rank 0: NCCL on CUDA, gloo on CPU."""
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return dist.get_backend()
    local_rank = str(device.index or 0)  # DeepSpeed places the engine on cuda:LOCAL_RANK
    for key, value in {"RANK": "0", "LOCAL_RANK": local_rank, "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first init
        # (about 90 CPU-seconds of C++; cached in ~/.cache/torch_extensions): one rank has
        # nothing to share, so it is marked unavailable and gloo does the (no-op) reduces.
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if compatible is not None:
            compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return backend


def train(cfg, args, device: torch.device, peak: float | None) -> dict:
    import deepspeed

    from cohortcast.config.training import StageConfig
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.deepspeed_setup import autocast_like, deepspeed_config

    backend = init_process_group(device)
    model, processors = build(cfg, args, device)
    parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 could partition them
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type in ("cpu", "cuda"))
    total_steps = len(args.crop) * (args.warmup + args.steps)
    stage = StageConfig(
        max_steps=total_steps + 1, micro_batch_size=args.batch, lr=1e-4, warmup_steps=1, zero_stage=args.zero_stage
    )
    ds_config = deepspeed_config(stage, precision(args.dtype), world_size=1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    scheduler = train_scheduler(cfg.scheduler)

    def step(batch: dict) -> None:
        with autocast_like(engine.module):
            value = loss(engine, scheduler, batch)
        engine.backward(value)
        engine.step()

    result = {
        "backend": backend,
        # one rank: a requested ZeRO-2 runs as ZeRO-1, as the stages run it (same math)
        "zero_stage_requested": args.zero_stage,
        "deepspeed_config": {k: ds_config[k] for k in ("zero_optimization", "bf16", "fp16", "gradient_clipping")},
        "optimizer": f"torch.optim.AdamW (fused={optimizer.defaults.get('fused')})",
        "attention_processors": processors,
        "conv_weights_channels_last": common.conv_weights_channels_last(engine.module),
        "weights_dtype": str(next(engine.module.parameters()).dtype).removeprefix("torch."),
        "parameters": parameters,
        "crops": {},
    }
    for crop in args.crop:
        batches = [make_batch(cfg, crop, args.batch, device, k, memory_format(args)) for k in range(4)]
        with common.output_layout(engine.module.unet.conv_out) as layout:
            flops, _ = common.count_flops(lambda b=batches[0]: step(b))  # the first warm-up step
        for k in range(1, args.warmup):
            step(batches[k % len(batches)])
        common.synchronize(device)
        common.reset_peak_memory(device)
        times = []
        for k in range(args.steps):
            common.synchronize(device)
            started = time.perf_counter()
            step(batches[k % len(batches)])
            common.synchronize(device)
            times.append(time.perf_counter() - started)
        seconds = sum(times)
        result["crops"][str(crop)] = per_crop_shapes(cfg, crop, args) | {
            "activations_channels_last": layout.get("channels_last"),
            "flops_per_step": flops,
            "flops_per_sample": flops / args.batch,
            "step_seconds": times,
            "median_step_s": statistics.median(times),
            "samples_per_s": args.steps * args.batch / seconds,
            "peak_memory": common.peak_memory(device),
            **common.throughput(flops * args.steps, seconds, peak),
        }
    return result


def precision(name: str):
    from cohortcast.training.deepspeed_setup import Precision

    return Precision(name, f"{name} requested (benchmarks/gpu_training.py --dtype)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    dtype = common.DTYPES[args.dtype]
    # DeepSpeed picks its accelerator once, on first use: the device asked for, not whatever
    # the machine has (a --smoke run on a GPU machine stays on the CPU).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    cfg = model_config(args)
    env = common.environment(device, dtype)
    peak = common.peak_bf16_tflops(env["device_name"]) if device.type == "cuda" else None
    result = {
        "benchmark": "gpu_training",
        "mode": "count-only" if args.count_only else "smoke" if args.smoke else "full",
        **env,
        "flavour": "debug" if args.smoke else "sd15",
        "model": "stage-c/d denoiser (training.ldm_stage.build_denoiser), random weights",
        "memory_format": args.memory_format,
        "flops_counted_with": common.FLOPS_COUNTED_WITH + " (forward + backward of one step)",
        "peak_bf16_tflops": peak,
        "warmup": args.warmup,
        "steps": args.steps,
        **(count_only(cfg, args, device) if args.count_only else train(cfg, args, device, peak)),
    }
    report(result)
    common.write_json(args.json, result)
    return result


def report(r: dict) -> None:
    print(
        f"{r['benchmark']} ({r['mode']}): {r['device_name']} [{r['device']}], torch {r['torch_version']}, {r['dtype']}"
    )
    print(f"model: {r['flavour']} flavour {r['model']}; attention {r['attention_processors']}; {r['memory_format']}")
    if "deepspeed_config" in r:
        print(f"DeepSpeed: {r['deepspeed_config']}, {r['optimizer']}, {r['backend']}, weights {r['weights_dtype']}")
    for row in r["crops"].values():
        line = (
            f"crop {row['crop']} (latents {'x'.join(map(str, row['latent']))}), micro-batch {row['micro_batch']}: "
            f"{row['flops_per_sample'] / 1e9:.3f} GFLOP per sample (forward + backward)"
        )
        if "samples_per_s" in row:
            frac = (
                f" = {row['fraction_of_peak']:.1%} of {row['peak_bf16_tflops']:.0f}" if row["fraction_of_peak"] else ""
            )
            line += (
                f"; {row['samples_per_s']:.2f} samples/s, {row['tflops_achieved']:.3f} TFLOP/s{frac}, "
                f"peak memory {row['peak_memory']['bytes'] / 2**30:.2f} GiB ({row['peak_memory']['kind']})"
            )
        print(line)


if __name__ == "__main__":
    main()
