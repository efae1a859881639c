"""Stage c: unconditional latent-diffusion pre-training (NAMD Eq. 9). The denoiser
learns the marginal distribution of nodule latents from the cache with the null
context and a zero baseline; stage d (conditional fine-tuning) starts from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cohortcast.config.models import ForecasterConfig
from cohortcast.config.training import StageConfig

DENOISER_FILE = "denoiser.safetensors"


def latent_dataset(cache: str | Path, split: str = "train", data_cpus: float = 0.5):
    """The split's latents, streamed (lazy: read while the workers train, in the CPUs
    `training.scaling.data_cpus` keeps free), or None when the split has no rows."""
    from cohortcast.training.data_streaming import stream_parquet

    folder = Path(cache) / "nodules" / f"split={split}"
    if not folder.is_dir():
        return None
    return stream_parquet(folder, ["latent_d8"], data_cpus)  # only numeric columns reach the batches


def random_orientation(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Cache rows (B, 8, c, h, w) -> one orientation per row, drawn by `rng` (augmentation)."""
    views = np.asarray(batch["latent_d8"], np.float32)
    pick = rng.integers(0, views.shape[1], views.shape[0])
    return {"latent": torch.from_numpy(np.ascontiguousarray(views[np.arange(views.shape[0]), pick]))}


def build_denoiser(cfg: ForecasterConfig):
    from cohortcast.models.denoiser import ConditionalDenoiser

    return ConditionalDenoiser(cfg.denoiser, cfg.vae.latent_channels, cfg.vae.latent_side, ehr_dim=None)


def diffusion_loss(
    denoiser, scheduler, latents: torch.Tensor, baseline: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """MSE to the prediction target (epsilon, v or x0; SchedulerConfig.prediction_type) at
    uniformly drawn timesteps (DDPM, NAMD Eq. 1/9/10)."""
    from cohortcast.models.schedulers import training_target

    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    out = denoiser(scheduler.add_noise(latents, noise, t), t, baseline, context)
    return F.mse_loss(out.float(), training_target(scheduler, latents, noise, t).float())


def unconditional_loss(engine, scheduler, latents: torch.Tensor) -> torch.Tensor:
    null = engine.module.null(latents.shape[0])
    latents = latents.to(null.dtype)
    return diffusion_loss(engine, scheduler, latents, torch.zeros_like(latents), null)


def validate_unconditional(engine, batches, scheduler, seed: int, max_rows: int):
    device = next(engine.module.parameters()).device
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same timesteps and noise at every validation
        for batch in batches:
            latents = torch.from_numpy(np.asarray(batch["latent_d8"], np.float32)[:, 0]).to(device)
            total += float(unconditional_loss(engine, scheduler, latents)) * latents.shape[0]
            seen += latents.shape[0]
            if seen >= max_rows:
                break
    return ({"loss_diffusion": total / seen} if seen else {}), {}


def ldm_unconditional_worker_loop(config: dict) -> None:
    """Ray Train loop; config: {"stage": StageConfig, "model": ForecasterConfig,
    optional "validation": ValidationConfig, "tracking"}."""
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    stage: StageConfig = config["stage"]
    model_cfg: ForecasterConfig = config["model"]
    scheduler = train_scheduler(model_cfg.scheduler)
    val = config.get("validation")
    hooks = StageHooks(tracking=config.get("tracking"), prepare_batch=random_orientation)
    if val is not None:
        hooks.validate = lambda engine, batches: validate_unconditional(
            engine, batches, scheduler, val.seed, val.max_rows
        )
        hooks.validate_every_epochs = val.every_epochs
    run_stage_loop(
        stage,
        lambda: build_denoiser(model_cfg),
        lambda engine, batch: {"total": unconditional_loss(engine, scheduler, batch["latent"])},
        hooks,
    )
