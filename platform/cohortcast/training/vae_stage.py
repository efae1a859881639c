"""Stage a: fine-tune the nodule-aligned VAE on ingested crops (NAMD Eq. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cohortcast.config.models import VAEConfig
from cohortcast.config.training import StageConfig
from cohortcast.data.manifest import NODULE_EHR


def to_vae_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ingested nodule rows -> image (B, 1, H, W), alignment features (B, F), label (B,)."""
    from cohortcast.models.alignment import nodule_features

    rows = [{k: batch[k][i] for k in NODULE_EHR} for i in range(len(batch["malignant"]))]
    return {"image": np.asarray(batch["crop"], dtype=np.float32)[:, None],
            "features": nodule_features(rows).numpy(),
            "label": np.asarray(batch["malignant"], dtype=np.float32)}


def vae_dataset(ingested: str | Path, split: str = "train"):
    import ray.data

    ds = ray.data.read_parquet(str(Path(ingested) / "nodules" / f"split={split}"))
    # Materialised before training, as in ldm_stage.latent_dataset: Train workers hold
    # their CPUs and a lazy pipeline's read tasks could not be scheduled on a small machine.
    return ds.map_batches(to_vae_batch, batch_format="numpy").materialize()


def vae_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; config: {"stage": StageConfig, "model": VAEConfig}."""
    from cohortcast.models.vae import NoduleVAE
    from cohortcast.models.vae_loss import build_perceptual, vae_loss
    from cohortcast.training.stage_loop import run_stage_loop

    stage: StageConfig = config["stage"]
    model_cfg: VAEConfig = config["model"]
    perceptual = build_perceptual(model_cfg.loss)

    def loss_fn(engine, batch):
        if perceptual is not None:
            perceptual.to(batch["image"].device)
        out = engine(batch["image"])
        return vae_loss(out, batch["image"], batch["features"], batch["label"], model_cfg.loss, perceptual)

    run_stage_loop(stage, lambda: NoduleVAE(model_cfg), loss_fn)
