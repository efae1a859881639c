"""diffusers schedulers from SchedulerConfig: DDPM to train, DDIM to sample, sharing
one beta schedule so the sampler inverts exactly the noise the trainer added."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

from cohortcast.config.models import SchedulerConfig


def train_scheduler(cfg: SchedulerConfig) -> DDPMScheduler:
    # clip_sample off: latents are not confined to [-1, 1] like pixels.
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def inference_scheduler(cfg: SchedulerConfig) -> DDIMScheduler:
    return DDIMScheduler.from_config(train_scheduler(cfg).config, set_alpha_to_one=False, steps_offset=1)
