"""What benchmarks/gpu_forecast.py and benchmarks/gpu_training.py share: device and dtype
choice, SDPA attention and channels_last on diffusers models, FLOP counting, the bf16 peak
table, peak memory and the environment block of the JSON. Not a benchmark itself."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (half the
# "with sparsity" figure), matched on torch.cuda.get_device_name(); the first match wins, so
# the PCIe / NVL variants come before the SXM parts they would otherwise match.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
)

_ATEN = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_model_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Attention backward as model FLOPs: the 4 products of the gradients (dV, dP, dQ, dK),
    twice the forward; torch's formula adds the fused kernels' recompute of Q K^T."""
    b, h, s_q, d = query
    s_k = key[2]
    return sdpa_backward_flop_count(grad_out, query, key, value) - 2 * b * h * s_q * d * s_k


# Attention FLOPs, the same on every device: FlopCounterMode counts the CUDA SDPA kernels
# (flash, memory-efficient, cuDNN) and the math path's bmm (meta device, masked CPU
# attention), but not the CPU flash kernel, and its fused backward formulas include the
# recompute of Q K^T that the math path has not. These entries add the CPU kernel and count
# every backward as model FLOPs (2 x forward), as the math path does.
SDPA_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_model_flops,
    _ATEN._scaled_dot_product_flash_attention_backward: _sdpa_backward_model_flops,
    _ATEN._scaled_dot_product_efficient_attention_backward: _sdpa_backward_model_flops,
    _ATEN._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_model_flops,
}
FLOPS_COUNTED_WITH = (
    "torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention (SDPA; backward "
    "without the fused kernels' recompute), 2 FLOPs per multiply-add; normalisation, activations and "
    "element-wise ops are not counted"
)


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run fn() once under FlopCounterMode -> (total FLOPs, FLOPs per module name); the
    module names are ModuleTracker's ("ConditionalDenoiser", "ConditionalDenoiser.unet", ...)."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        fn()
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module


def pick_device(name: str | None) -> torch.device:
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "meta":
        return "meta device (shapes only: FLOPs counted, nothing computed)"
    return f"{platform.machine()} CPU ({os.cpu_count()} cores)"


def peak_bf16_tflops(name: str) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_TFLOPS, None when it is not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def use_sdpa(module: torch.nn.Module) -> list[str]:
    """Every diffusers Attention inside `module` attends through torch's
    scaled_dot_product_attention (AttnProcessor2_0); the processors now active, by class name."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    names = set()
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.set_processor(AttnProcessor2_0())
            names.add(type(sub.processor).__name__)
    return sorted(names)


def conv_weights_channels_last(module: torch.nn.Module) -> bool | None:
    """Whether every 4-D parameter is stored channels_last (None: the module has none)."""
    weights = [p for p in module.parameters() if p.dim() == 4]
    if not weights:
        return None
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@contextlib.contextmanager
def output_layout(module: torch.nn.Module):
    """Yields a dict that gets "channels_last": whether `module`'s first output inside the
    block was channels_last (the U-Net's conv_out: which layout the activations ran in)."""
    seen: dict[str, bool] = {}

    def hook(_module, _inputs, out) -> None:
        seen.setdefault("channels_last", out.is_contiguous(memory_format=torch.channels_last))

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _rss_field(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            line = next(row for row in fh if row.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def reset_peak_memory(device: torch.device) -> None:
    """CUDA: reset the allocator's peak; CPU: reset the process's RSS high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict:
    """Peak since reset_peak_memory: CUDA max_memory_allocated (tensors only) or CPU RSS (VmHWM)."""
    if device.type == "cuda":
        return {"kind": "torch.cuda.max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"kind": "peak RSS (VmHWM, whole process)", "bytes": _rss_field("VmHWM")}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    import diffusers

    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "diffusers_version": diffusers.__version__,
        "python_version": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
    }


def throughput(flops: float, seconds: float, peak: float | None) -> dict:
    achieved = flops / seconds / 1e12
    return {
        "tflops_achieved": achieved,
        "peak_bf16_tflops": peak,
        "fraction_of_peak": achieved / peak if peak else None,
    }


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")
