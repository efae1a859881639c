"""Training configs: how a stage runs on Ray Train + DeepSpeed (not what it trains)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cohortcast.config.loader import require as _require


@dataclass
class StageConfig:
    """One training stage (VAE fine-tune, LDM unconditional, LDM conditional).

    Optimiser and schedule follow NAMD App. B: AdamW, linear warmup from
    `lr * warmup_min_ratio` to `lr` over `warmup_steps`, cosine decay to `lr * min_lr_ratio`
    at `max_steps`, gradient clipping 1.0. `micro_batch_size` is per worker; the global
    batch is micro_batch_size x grad_accumulation x workers.
    """

    max_steps: int = 20
    micro_batch_size: int = 8
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 2
    warmup_min_ratio: float = 0.01
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    # "auto": bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 23
    log_every: int = 1
    checkpoint_every: int = 10

    def validate(self) -> None:
        _require(self.max_steps >= 1, "max_steps", "must be >= 1")
        _require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _require(self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(0 <= self.warmup_steps < self.max_steps, "warmup_steps", "must be in [0, max_steps)")
        _require(0 < self.min_lr_ratio <= 1 and 0 < self.warmup_min_ratio <= 1, "min_lr_ratio", "must be in (0, 1]")
        _require(self.grad_clip > 0, "grad_clip", "must be > 0")
        _require(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every", "must be >= 1")


@dataclass
class ScalingSettings:
    """Ray Train workers and where runs (checkpoints, results) are stored."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "runs/demo/ray_results"
    max_failures: int = 1
    checkpoints_to_keep: int = 2

    def validate(self) -> None:
        _require(self.num_workers >= 1, "num_workers", "must be >= 1")
        _require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = retry forever)")
        _require(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")
