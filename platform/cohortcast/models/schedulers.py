"""diffusers schedulers from SchedulerConfig: DDPM to train, DDIM or DPM-Solver++ to
sample, sharing one beta schedule so the sampler inverts exactly the noise the trainer
added."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from cohortcast.config.models import SAMPLERS, SchedulerConfig


def train_scheduler(cfg: SchedulerConfig) -> DDPMScheduler:
    # clip_sample off: latents are not confined to [-1, 1] like pixels.
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def inference_scheduler(cfg: SchedulerConfig, sampler: str | None = None):
    """The sampler's scheduler (`sampler` overrides cfg.sampler). DPM-Solver++ is the
    2nd-order multistep solver in data-prediction form (Lu et al. 2022), which diffusers
    recommends for guided sampling in 10-25 steps; `lower_order_final` keeps its last
    steps first order, which is what makes it stable below 15 steps. Its steps are
    uniform in log-SNR (`use_lu_lambdas`, the paper's spacing): with diffusers' default
    linear-in-t spacing 10 steps were no closer to the exact ODE solution than 10 DDIM
    steps (tests/test_models_forecaster.py measures both)."""
    sampler = sampler or cfg.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
    base = train_scheduler(cfg).config
    if sampler == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            base,
            algorithm_type="dpmsolver++",
            solver_order=2,
            lower_order_final=True,
            final_sigmas_type="zero",
            use_lu_lambdas=True,
        )
    return DDIMScheduler.from_config(base, set_alpha_to_one=False, steps_offset=1)


def default_eta(cfg: SchedulerConfig, sampler: str | None) -> float:
    """The model's eta when it samples with DDIM; 0 for a sampler that takes none."""
    return cfg.eta if (sampler or cfg.sampler) == "ddim" else 0.0


def expand_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return values.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def training_target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the network regresses for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, t)
    if kind == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {kind!r}")


def predicted_clean(
    alphas_cumprod: torch.Tensor, noisy: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 implied by a network output, in fp32 (DDPM Eq. 15 for epsilon; x0 = sqrt(a) x_t -
    sqrt(1 - a) v for v-prediction)."""
    a = expand_like(alphas_cumprod[t.to(alphas_cumprod.device)], noisy).float()
    x, out = noisy.float(), prediction.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
