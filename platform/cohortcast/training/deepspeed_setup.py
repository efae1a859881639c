"""One place decides device and precision, and says why (nanochat style), and one
function turns a StageConfig into a DeepSpeed config dict.

The optimiser is a torch AdamW passed to deepspeed.initialize, not an "optimizer"
block: DeepSpeed would otherwise build its native CPU Adam op on first use (minutes on
CPU). The LR schedule is DeepSpeed's WarmupCosineLR (NAMD App. B's warmup + cosine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cohortcast.config.training import StageConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    reason: str


def choose_precision(requested: str, device: torch.device) -> Precision:
    if device.type != "cuda":
        if requested not in ("auto", "fp32"):
            return Precision("fp32", f"{requested} requested but training on {device.type}: using fp32")
        return Precision("fp32", f"training on {device.type}: fp32")
    if requested != "auto":
        return Precision(requested, f"{requested} requested")
    if torch.cuda.is_bf16_supported():
        return Precision("bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
    return Precision("fp16", f"{torch.cuda.get_device_name(device)} has no bf16: fp16 with loss scaling")


def effective_zero_stage(requested: int, world_size: int) -> int:
    """ZeRO-2 on one rank runs as ZeRO-1: gradient partitioning has no one to share with,
    and its per-gradient hooks and bucket copies cost 5-10% of a step on one worker
    (benchmarks/training_overhead.py). Both stages use the same optimizer class and
    checkpoint files and give bitwise-identical weights on one rank
    (tests/test_deepspeed_setup.py), so a run resumed on more ranks, or fewer, loads the
    same checkpoints. ZeRO-3 stays (its checkpoints partition the parameters)."""
    return 1 if requested == 2 and world_size == 1 else requested


def deepspeed_config(cfg: StageConfig, precision: Precision, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accumulation * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": effective_zero_stage(cfg.zero_stage, world_size)},
        "bf16": {"enabled": precision.name == "bf16"},
        "fp16": {"enabled": precision.name == "fp16"},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.max_steps,
                "warmup_num_steps": cfg.warmup_steps,
                "warmup_min_ratio": cfg.warmup_min_ratio,
                "cos_min_ratio": cfg.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,  # we log ourselves, on rank 0
        "wall_clock_breakdown": False,
    }


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_like(module: torch.nn.Module):
    """DeepSpeed bf16/fp16 casts the weights but not the inputs; autocast to the weights'
    dtype lets fp32 batches (and fp32 side computations like date embeddings) meet them.
    A no-op for fp32 weights (CPU, CI)."""
    import contextlib

    dtype = next(module.parameters()).dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device = next(module.parameters()).device
    return torch.autocast(device_type=device.type, dtype=dtype)
