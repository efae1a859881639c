"""Multi-sample DDIM forecasting with the SD1.5-sized Forecaster on one device (issue 17 item 5).

    python benchmarks/gpu_forecast.py --json gpu_forecast.json              # sd15, bf16, first GPU
    python benchmarks/gpu_forecast.py --compile --json gpu_forecast_compiled.json
    python benchmarks/gpu_forecast.py --smoke --json /tmp/smoke.json         # debug sizes on CPU, seconds
    python benchmarks/gpu_forecast.py --count-only --json /tmp/flops.json    # FLOPs only, no timing

The model is the `sd15` flavour (SD1.5-sized VAE and U-Net, cross-attention width 768,
768-wide temporal transformer), randomly initialised: no weights are available offline
and speed does not depend on them. No MedGemma either: by default there is no LLM
conditioner (the EHR context token is the learned null token); `--llm tiny` conditions on
a tiny random Gemma 3 (models/tiny_llm.py) to exercise that code path. Weights are cast
to the dtype, every diffusers attention uses AttnProcessor2_0 (torch SDPA), 4-D weights
are channels_last, and `--compile` compiles the U-Net with torch.compile.

Two paths are timed, after `--warmup` untimed runs of the same shapes (CUDA synchronised
around every timing):
  denoise   the DDIM loop alone (models.sampler.forecast_latents, as the Forecaster runs
            it: fixed micro-batches, seeded noise per sample) on random baseline latents
            and contexts, in the dtype without autocast;
  forecast  Forecaster.forecast end to end (VAE encode, temporal context, DDIM loop, VAE
            decode, compose) under torch.autocast(dtype), as the cohort job calls it.
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (matmul, conv, SDPA):
one denoiser call at the micro-batch shape, and one 1-step forecast for the rest (VAE,
temporal). Achieved TFLOP/s = counted FLOPs x calls / best measured time, against the
device's dense bf16 peak (H100 SXM / H200 989, A100 312; null when not in the table).
The cohort figure extrapolates to 450 cases x 20 samples x 50 steps.

`--smoke` runs the same code on the `debug` flavour (32 px crops, 8x8 latents), 1 case x
2 samples x 2 steps on the CPU, in a few seconds. `--count-only` counts FLOPs on the meta
device (no memory, no compute: device independent) and times nothing.
Record GPU output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time

import torch

try:  # run as a script: benchmarks/ is sys.path[0]
    import gpu_common as common
except ImportError:  # python -m benchmarks.gpu_forecast
    from benchmarks import gpu_common as common

COHORT = {"cases": 450, "samples": 20, "steps": 50}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu_forecast.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: cuda:0 if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(common.DTYPES), default="bf16", help="weights and compute dtype (default bf16)"
    )
    parser.add_argument("--crop", type=int, help="crop size in px (default 64 for sd15: 8x8 latents; 32 for --smoke)")
    parser.add_argument("--cases", type=int, help="cases per forecast call (default 4; 1 for --smoke)")
    parser.add_argument("--samples", type=int, help="samples per case (default 20; 2 for --smoke)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; 2 for --smoke)")
    parser.add_argument(
        "--micro-batch",
        type=int,
        help="rows per denoiser call (scheduler.micro_batch; default 20, the flavour's, = one case of 20 samples)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each path first (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path; the best counts (default 3)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the denoiser's U-Net (after the FLOPs are counted)"
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default 'default')")
    parser.add_argument(
        "--memory-format",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="layout of the 4-D (conv) weights; the activations follow them (default channels_last)",
    )
    parser.add_argument(
        "--llm", choices=("none", "tiny"), default="none", help="EHR conditioner: none, or a tiny random Gemma 3"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="debug flavour, 1 case x 2 samples x 2 steps, CPU")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="count one denoiser call's FLOPs on the meta device (any machine, seconds); no timing",
    )
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    small = args.smoke
    defaults = {
        "crop": 32 if small else 64,
        "cases": 1 if small else 4,
        "samples": 2 if small else 20,
        "steps": 2 if small else 50,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.micro_batch is None:
        args.micro_batch = args.samples if small else 20
    if args.smoke and args.device is None:
        args.device = "cpu"
    if args.count_only:
        if args.llm != "none":
            parser.error("--count-only counts the denoiser alone: it takes no --llm")
        args.device = "meta"
    for key in ("crop", "cases", "samples", "steps", "micro_batch", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    factor = 4 if small else 8  # the debug VAE halves twice, SD1.5's three times
    if args.crop % factor:
        parser.error(f"--crop must be a multiple of {factor} (the VAE's downsampling)")
    return args


def build_forecaster(args, device: torch.device, dtype: torch.dtype, llm_folder: str | None):
    from cohortcast.config.presets import flavor
    from cohortcast.models.forecaster import Forecaster

    cfg = flavor("debug" if args.smoke else "sd15")
    cfg.vae.sample_size = args.crop
    # untrained: unit scales stand in for the ones training computes
    cfg.vae.scaling_factor = 1.0
    cfg.denoiser.change_scale = 1.0
    cfg.scheduler.micro_batch = args.micro_batch
    cfg.conditioner.llm_path = llm_folder
    torch.manual_seed(0)
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = Forecaster(cfg).eval()
    model.to(device=device, dtype=dtype)
    if model.conditioner is not None and hasattr(model.conditioner, "lm"):
        model.conditioner.lm.to(device)  # the frozen LM sits outside the module tree; keeps its own dtype
    if args.memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    return model


def write_tiny_llm(folder: str) -> str:
    from cohortcast.models.ehr_prompt import render_ehr_prompt
    from cohortcast.models.tiny_llm import write_tiny_gemma3

    return str(write_tiny_gemma3(folder, [render_ehr_prompt({})]))


class Bench:
    """The model, its inputs and the two timed paths."""

    def __init__(self, args, model, device: torch.device, dtype: torch.dtype):
        self.args, self.model, self.device, self.dtype = args, model, device, dtype
        cfg = model.cfg
        b = args.cases
        gen = torch.Generator().manual_seed(1)
        self.case_ids = [f"case-{i}" for i in range(b)]
        self.images = (torch.rand(b, cfg.vae.in_channels, args.crop, args.crop, generator=gen) * 2 - 1).to(device)
        self.horizon = torch.full((b,), 365.0, device=device)
        self.ehr = [{} for _ in range(b)] if model.conditioner is not None else None
        self.baseline = torch.randn(b, *model.latent_shape, generator=gen).to(device=device, dtype=dtype)
        self.context = torch.randn(b, 3, cfg.denoiser.cross_attention_dim, generator=gen).to(device=device, dtype=dtype)
        self.scheduler = model.inference_scheduler("ddim")
        self.rows = b * args.samples
        self.calls_per_step = math.ceil(self.rows / args.micro_batch)

    def autocast(self):
        if self.dtype == torch.float32 or self.device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def denoise(self, steps: int | None = None):
        from cohortcast.models.sampler import forecast_latents

        with torch.no_grad():
            return forecast_latents(
                self.model.denoiser,
                self.scheduler,
                self.baseline,
                self.context,
                self.case_ids,
                self.args.samples,
                0,
                steps or self.args.steps,
                1.0,
                0.0,
                self.args.micro_batch,
            )

    def forecast(self, steps: int | None = None):
        with self.autocast():
            return self.model.forecast(
                self.images,
                self.horizon,
                self.case_ids,
                ehr=self.ehr,
                num_samples=self.args.samples,
                steps=steps or self.args.steps,
                guidance_scale=1.0,
                eta=0.0,
                sampler="ddim",
            )

    def one_denoiser_call(self):
        mb = self.args.micro_batch
        noisy = torch.randn(mb, *self.model.latent_shape, device=self.device, dtype=self.dtype)
        t = torch.tensor(int(self.scheduler.config.num_train_timesteps) - 1, device=self.device)
        base = self.baseline[:1].expand(mb, *self.baseline.shape[1:])
        ctx = self.context[:1].expand(mb, *self.context.shape[1:])
        with torch.no_grad():
            return self.model.denoiser(noisy, t, base, ctx)


def count(bench: Bench) -> tuple[dict, bool | None]:
    """FLOPs of one denoiser call and of a forecast outside it; whether the U-Net ran channels_last."""
    with common.output_layout(bench.model.denoiser.unet.conv_out) as layout:
        per_call, _ = common.count_flops(bench.one_denoiser_call)
    flops = {
        "per_denoiser_call": per_call,
        "denoiser_call_rows": bench.args.micro_batch,
        "per_denoiser_row": per_call / bench.args.micro_batch,
        "denoiser_calls_per_step": bench.calls_per_step,
        "counted_with": common.FLOPS_COUNTED_WITH,
    }
    if bench.device.type != "meta":  # the scheduler indexes its tables by value: not on meta
        total, per_module = common.count_flops(lambda: bench.forecast(steps=1))
        in_denoiser = per_module.get("ConditionalDenoiser", 0)
        if in_denoiser != bench.calls_per_step * per_call:
            raise RuntimeError(
                f"a 1-step forecast spent {in_denoiser} FLOPs in the denoiser, expected "
                f"{bench.calls_per_step} x {per_call}: the call count or the shapes differ"
            )
        flops["forecast_outside_denoiser"] = total - in_denoiser  # VAE encode/decode, temporal, LLM
    return flops, layout.get("channels_last")


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        common.synchronize(device)
        started = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float], samples: int, flops: int, peak: float | None) -> dict:
    best = min(times)
    return {
        "seconds": times,
        "best_s": best,
        "median_s": statistics.median(times),
        "samples_per_s": samples / best,
        "flops": flops,
        **common.throughput(flops, best, peak),
    }


def cohort_extrapolation(denoise: dict, forecast: dict, args) -> dict:
    """Denoiser time scales with samples x steps; the rest of a forecast (VAE, temporal,
    outputs) with samples only."""
    samples = args.cases * args.samples
    per_sample_step = denoise["best_s"] / (samples * args.steps)
    per_sample_rest = max(forecast["best_s"] - denoise["best_s"], 0.0) / samples
    rows = COHORT["cases"] * COHORT["samples"]
    seconds = rows * (COHORT["steps"] * per_sample_step + per_sample_rest)
    return {
        **COHORT,
        "seconds": seconds,
        "hours": seconds / 3600,
        "assumes": (
            "one device; the denoise time per sample-step and the rest of a forecast per sample as "
            f"measured here (micro-batch {args.micro_batch}, {args.cases} case(s) per call); Ray, "
            "reading and writing outside it"
        ),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    dtype = common.DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        llm_folder = write_tiny_llm(tmp) if args.llm == "tiny" else None
        model = build_forecaster(args, device, dtype, llm_folder)
        processors = {"denoiser": common.use_sdpa(model.denoiser), "vae": common.use_sdpa(model.vae)}
        bench = Bench(args, model, device, dtype)
        result = {
            "benchmark": "gpu_forecast",
            "mode": "count-only" if args.count_only else "smoke" if args.smoke else "full",
            **common.environment(device, dtype),
            "flavour": "debug" if args.smoke else "sd15",
            "weights": "random (no trained weights offline; speed does not depend on them)",
            "llm_conditioner": (
                "tiny random Gemma 3 (models/tiny_llm.py: hidden 32, 2 layers), EHR records all 'not recorded'"
                if llm_folder
                else "none (no LLM: the EHR context token is the learned null token)"
            ),
            "attention_processors": processors,
            "memory_format": args.memory_format,
            "conv_weights_channels_last": common.conv_weights_channels_last(model.denoiser),
            "precision": (
                f"weights in {args.dtype}; 'denoise' runs in {args.dtype} without autocast, 'forecast' "
                f"under torch.autocast({args.dtype}) (its dates and LLM vector are fp32)"
                if dtype != torch.float32
                else "fp32 throughout"
            ),
            "compile": args.compile,
            "compile_mode": args.compile_mode if args.compile else None,
            "shapes": {
                "crop": args.crop,
                "latent": list(model.latent_shape),
                "cases_per_call": args.cases,
                "samples_per_case": args.samples,
                "steps": args.steps,
                "micro_batch": args.micro_batch,
                "denoiser_input": [args.micro_batch, 2 * model.latent_shape[0], *model.latent_shape[1:]],
                "context": [args.micro_batch, 3, model.cfg.denoiser.cross_attention_dim],
                "guidance_scale": 1.0,
                "sampler": "ddim, eta 0",
            },
            "parameters": {
                "denoiser": sum(p.numel() for p in model.denoiser.parameters()),
                "vae": sum(p.numel() for p in model.vae.parameters()),
                "temporal": sum(p.numel() for p in model.temporal.parameters()),
            },
        }
        if model.conditioner is not None and hasattr(model.conditioner, "lm"):
            result["attention_processors"]["llm"] = [str(model.conditioner.lm.config._attn_implementation)]
        result["flops"], result["activations_channels_last"] = count(bench)
        if not args.count_only:
            if args.compile:
                model.denoiser.unet.compile(mode=args.compile_mode)
            peak = common.peak_bf16_tflops(result["device_name"]) if device.type == "cuda" else None
            result["peak_bf16_tflops"] = peak
            per_call = result["flops"]["per_denoiser_call"]
            denoise_flops = args.steps * bench.calls_per_step * per_call
            result["warmup"], result["repeats"] = args.warmup, args.repeats
            result["denoise"] = summary(
                timed(bench.denoise, device, args.warmup, args.repeats), bench.rows, denoise_flops, peak
            )
            common.reset_peak_memory(device)
            forecast_times = timed(bench.forecast, device, args.warmup, args.repeats)
            result["forecast"] = summary(
                forecast_times, bench.rows, denoise_flops + result["flops"]["forecast_outside_denoiser"], peak
            )
            result["forecast"]["peak_memory"] = common.peak_memory(device)
            result["samples_per_s"] = result["forecast"]["samples_per_s"]
            result["cohort_extrapolation"] = cohort_extrapolation(result["denoise"], result["forecast"], args)
    report(result)
    common.write_json(args.json, result)
    return result


def report(r: dict) -> None:
    s, f = r["shapes"], r["flops"]
    print(
        f"{r['benchmark']} ({r['mode']}): {r['device_name']} [{r['device']}], torch {r['torch_version']}, {r['dtype']}"
    )
    print(
        f"model: {r['flavour']} flavour, denoiser {r['parameters']['denoiser'] / 1e6:.1f} M params, "
        f"VAE {r['parameters']['vae'] / 1e6:.1f} M; LLM: {r['llm_conditioner']}"
    )
    print(
        f"attention: {r['attention_processors']}; {r['memory_format']} weights (activations channels_last: "
        f"{r['activations_channels_last']}); compile: "
        f"{r['compile_mode'] if r['compile'] else 'off'}"
    )
    print(
        f"shapes: {s['crop']} px crops, latents {'x'.join(map(str, s['latent']))}, {s['cases_per_call']} case(s) x "
        f"{s['samples_per_case']} samples x {s['steps']} steps, micro-batch {s['micro_batch']}"
    )
    print(
        f"FLOPs: {f['per_denoiser_call'] / 1e9:.3f} GFLOP per denoiser call of {f['denoiser_call_rows']} rows "
        f"({f['per_denoiser_row'] / 1e9:.4f} GFLOP per row)"
        + (
            f"; {f['forecast_outside_denoiser'] / 1e9:.3f} GFLOP per forecast call outside it"
            if "forecast_outside_denoiser" in f
            else ""
        )
    )
    for path in ("denoise", "forecast"):
        if path in r:
            p = r[path]
            frac = f" = {p['fraction_of_peak']:.1%} of {p['peak_bf16_tflops']:.0f}" if p["fraction_of_peak"] else ""
            print(
                f"{path:>9}: best {p['best_s']:.3f} s (median {p['median_s']:.3f}), {p['samples_per_s']:.2f} samples/s, "
                f"{p['tflops_achieved']:.3f} TFLOP/s{frac}"
            )
    if "cohort_extrapolation" in r:
        c = r["cohort_extrapolation"]
        print(
            f"cohort: {c['cases']} cases x {c['samples']} samples x {c['steps']} steps ~ {c['seconds']:.0f} s "
            f"({c['hours']:.2f} h) on this device; peak memory {r['forecast']['peak_memory']}"
        )


if __name__ == "__main__":
    main()
