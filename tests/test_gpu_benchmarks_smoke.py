"""benchmarks/gpu_forecast.py and benchmarks/gpu_training.py, `--smoke --json` on the CPU:
both run (in parallel subprocesses, one torch thread each: the file stays well under 40 s
on 2 cores), write the fields a GPU run is read by, report positive finite throughputs,
and count FLOPs that an independent count of the same tiny shapes reproduces exactly:
the denoiser call from the layer shapes (2 x multiply-adds of every conv, linear and
attention product, by forward hooks), the training step with FlopCounterMode on the meta
device (where attention is plain bmm, so the scripts' CPU SDPA formula is checked too)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("gpu_forecast", "gpu_training")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--threads", "1"]
            + ["--json", str(out / f"{name}.json")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in SCRIPTS
    }
    debug_denoiser("meta")  # this process's own imports (diffusers) while the scripts run
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        assert proc.returncode == 0, f"{name} --smoke failed:\n{output[-4000:]}"
        results[name] = json.loads((out / f"{name}.json").read_text())
    return results


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def debug_denoiser(device: str = "cpu"):
    from cohortcast.config.models import ForecasterConfig
    from cohortcast.training.ldm_stage import build_denoiser

    with torch.device(device):
        return build_denoiser(ForecasterConfig())  # the debug flavour = the dataclass defaults


def analytic_forward_flops(model, *inputs) -> int:
    """2 x multiply-adds of every Conv2d, Linear and attention product (QK^T and AV), from
    the shapes seen by forward hooks; nothing else (what FlopCounterMode counts too)."""
    from diffusers.models.attention_processor import Attention

    total = [0]

    def conv(mod, args, out):
        total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    def linear(mod, args, out):
        total[0] += 2 * (args[0].numel() // mod.in_features) * mod.in_features * mod.out_features

    def attention(mod, args, kwargs, out):
        hidden = args[0]
        context = kwargs.get("encoder_hidden_states")
        tokens_q = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]
        tokens_k = context.shape[1] if context is not None else tokens_q
        total[0] += 2 * 2 * hidden.shape[0] * tokens_q * tokens_k * mod.to_q.out_features

    handles = []
    for sub in model.modules():
        if isinstance(sub, torch.nn.Conv2d):
            handles.append(sub.register_forward_hook(conv))
        elif isinstance(sub, torch.nn.Linear):
            handles.append(sub.register_forward_hook(linear))
        elif isinstance(sub, Attention):
            handles.append(sub.register_forward_hook(attention, with_kwargs=True))
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return total[0]


def test_forecast_smoke_fields_and_throughput(smoke):
    r = smoke["gpu_forecast"]
    for key in ("device", "device_name", "torch_version", "dtype", "shapes", "llm_conditioner", "precision"):
        assert r[key], key
    assert r["mode"] == "smoke" and r["device"] == "cpu" and r["flavour"] == "debug"
    assert r["attention_processors"]["denoiser"] == ["AttnProcessor2_0"]
    assert r["memory_format"] == "channels_last" and r["conv_weights_channels_last"] is True
    assert r["activations_channels_last"] is True
    assert r["peak_bf16_tflops"] is None  # a CPU is not in the peak table
    s = r["shapes"]
    assert (s["cases_per_call"], s["samples_per_case"], s["steps"]) == (1, 2, 2)
    for path in ("denoise", "forecast"):
        assert len(r[path]["seconds"]) == r["repeats"]
        assert positive(r[path]["samples_per_s"]) and positive(r[path]["tflops_achieved"]), path
        assert r[path]["fraction_of_peak"] is None
    assert r["samples_per_s"] == r["forecast"]["samples_per_s"]
    assert positive(r["forecast"]["peak_memory"]["bytes"])
    assert positive(r["cohort_extrapolation"]["seconds"])
    assert (r["cohort_extrapolation"]["cases"], r["cohort_extrapolation"]["samples"]) == (450, 20)


def test_forecast_flops_match_an_independent_count(smoke):
    r = smoke["gpu_forecast"]
    s, f = r["shapes"], r["flops"]
    torch.manual_seed(0)
    model = debug_denoiser().eval()
    rows = s["micro_batch"]
    latent = s["latent"]
    inputs = (
        torch.randn(rows, *latent),
        torch.tensor(999),
        torch.randn(rows, *latent),
        torch.randn(rows, *s["context"][1:]),
    )
    assert f["denoiser_call_rows"] == rows and s["denoiser_input"] == [rows, 2 * latent[0], *latent[1:]]
    assert f["per_denoiser_call"] == analytic_forward_flops(model, *inputs)
    # the timed loop is steps x calls of that one call; the forecast adds the VAE and temporal parts
    assert f["denoiser_calls_per_step"] == 1
    assert r["denoise"]["flops"] == s["steps"] * f["per_denoiser_call"]
    assert r["forecast"]["flops"] == r["denoise"]["flops"] + f["forecast_outside_denoiser"]
    assert f["forecast_outside_denoiser"] > 0


def test_training_smoke_fields_and_throughput(smoke):
    r = smoke["gpu_training"]
    for key in ("device", "device_name", "torch_version", "dtype", "deepspeed_config", "optimizer"):
        assert r[key], key
    assert r["mode"] == "smoke" and r["backend"] == "gloo" and r["dtype"] == "bfloat16"
    # ZeRO-2 asked for; one rank runs it as ZeRO-1 (deepspeed_setup.effective_zero_stage)
    assert r["zero_stage_requested"] == 2 and r["deepspeed_config"]["zero_optimization"]["stage"] == 1
    assert r["deepspeed_config"]["bf16"]["enabled"]
    assert r["weights_dtype"] == "bfloat16" and r["attention_processors"] == ["AttnProcessor2_0"]
    assert r["peak_bf16_tflops"] is None
    (row,) = r["crops"].values()
    assert row["latent"] == [4, 8, 8] and row["micro_batch"] == 4
    # channels_last inputs, contiguous weights (DeepSpeed's): NCHW again after the first attention block
    assert row["activations_channels_last"] is False
    assert len(row["step_seconds"]) == r["steps"]
    assert positive(row["samples_per_s"]) and positive(row["tflops_achieved"])
    assert positive(row["peak_memory"]["bytes"])


def test_training_flops_match_an_independent_count(smoke):
    """The script counts its first DeepSpeed step on the CPU (bf16, fused AdamW, the CPU
    flash-attention kernel, its own attention formulas); here: a plain forward + backward on
    the meta device, stock FlopCounterMode, attention as plain bmm."""
    from torch.utils.flop_counter import FlopCounterMode

    from cohortcast.config.models import SchedulerConfig
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.ldm_stage import diffusion_loss

    (row,) = smoke["gpu_training"]["crops"].values()
    model = debug_denoiser("meta")
    scheduler = train_scheduler(SchedulerConfig())
    counts = {}
    for batch in (row["micro_batch"], 2 * row["micro_batch"]):
        latents = torch.randn(batch, *row["latent"], device="meta")
        context = torch.randn(batch, 3, model.cfg.cross_attention_dim, device="meta")
        with FlopCounterMode(display=False) as counter:
            diffusion_loss(model, scheduler, latents, latents, context).backward()
        counts[batch] = counter.get_total_flops()
    assert row["flops_per_step"] == counts[row["micro_batch"]]
    assert counts[2 * row["micro_batch"]] == 2 * counts[row["micro_batch"]]  # linear in the batch
    assert row["flops_per_sample"] * row["micro_batch"] == row["flops_per_step"]
    # backward costs one to two forwards (no input gradient for the first layers)
    forward = analytic_forward_flops(
        debug_denoiser().eval(),
        torch.randn(1, *row["latent"]),
        torch.tensor(999),
        torch.randn(1, *row["latent"]),
        torch.randn(1, 3, model.cfg.cross_attention_dim),
    )
    assert 2 * forward < row["flops_per_sample"] <= 3 * forward
