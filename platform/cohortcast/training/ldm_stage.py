"""Stage c: unconditional latent-diffusion pre-training (NAMD Eq. 9). The denoiser
learns the marginal distribution of nodule latents from the cache with the null
context and a zero baseline; stage d (conditional fine-tuning) starts from it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cohortcast.config.models import ForecasterConfig
from cohortcast.config.training import StageConfig


def latent_dataset(cache: str | Path, split: str = "train"):
    import ray.data

    # Only numeric columns reach the workers' torch batches. Materialised before training:
    # the Train workers hold their CPUs, and on a small machine the read tasks of a lazy
    # dataset would then wait for a CPU forever (seen on 2 CPUs). Latents are small.
    return ray.data.read_parquet(str(Path(cache) / "nodules" / f"split={split}")).select_columns(
        ["latent"]).materialize()


def build_denoiser(cfg: ForecasterConfig):
    from cohortcast.models.denoiser import ConditionalDenoiser

    side = cfg.vae.sample_size // cfg.vae.downsample_factor
    return ConditionalDenoiser(cfg.denoiser, cfg.vae.latent_channels, side, ehr_dim=None)


def diffusion_loss(denoiser, scheduler, latents: torch.Tensor, baseline: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (DDPM, NAMD Eq. 1/9/10)."""
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    return F.mse_loss(denoiser(scheduler.add_noise(latents, noise, t), t, baseline, context), noise)


def ldm_unconditional_worker_loop(config: dict) -> None:
    """Ray Train loop; config: {"stage": StageConfig, "model": ForecasterConfig}."""
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.stage_loop import run_stage_loop

    stage: StageConfig = config["stage"]
    model_cfg: ForecasterConfig = config["model"]
    scheduler = train_scheduler(model_cfg.scheduler)

    def loss_fn(engine, batch):
        latents = batch["latent"].float()
        null = engine.module.null(latents.shape[0]).to(latents.dtype)
        return {"total": diffusion_loss(engine, scheduler, latents, torch.zeros_like(latents), null)}

    run_stage_loop(stage, lambda: build_denoiser(model_cfg), loss_fn)
