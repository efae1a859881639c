"""Stage a: fine-tune the nodule-aligned VAE on ingested crops (NAMD Eq. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cohortcast.config.models import VAEConfig
from cohortcast.config.training import StageConfig
from cohortcast.data.manifest import NODULE_EHR


def to_vae_batch(batch: dict[str, np.ndarray], diameter_scale_mm: float = 2.5) -> dict[str, np.ndarray]:
    """Ingested nodule rows -> image (B, 1, H, W), alignment features (B, F), label (B,)."""
    from cohortcast.models.alignment import nodule_features

    rows = [{k: batch[k][i] for k in NODULE_EHR} for i in range(len(batch["malignant"]))]
    return {
        "image": np.asarray(batch["crop"], dtype=np.float32)[:, None],
        "features": nodule_features(rows, diameter_scale_mm).numpy(),
        "label": np.asarray(batch["malignant"], dtype=np.float32),
    }


def vae_dataset(ingested: str | Path, split: str = "train", diameter_scale_mm: float = 2.5, data_cpus: float = 0.5):
    """The split's crops as VAE batches, streamed (read and converted while the workers
    train, see training/data_streaming.py), or None when the split has no rows."""
    from cohortcast.training.data_streaming import data_task_cpus, stream_parquet

    folder = Path(ingested) / "nodules" / f"split={split}"
    if not folder.is_dir():
        return None
    return stream_parquet(folder, None, data_cpus).map_batches(
        to_vae_batch,
        fn_kwargs={"diameter_scale_mm": diameter_scale_mm},
        batch_format="numpy",
        num_cpus=data_task_cpus(data_cpus),  # same as the read: the two fuse into one task
    )


def scaling_factor_from_crops(vae, ingested: str | Path, split: str = "train", batch_size: int = 256) -> float:
    """The VAE's diffusion scaling factor from the split's crops (read with pyarrow on the
    driver: a few MB of 2D crops), see models.vae.posterior_mean_scaling_factor."""
    import pyarrow.dataset as pads
    import torch

    from cohortcast.models.vae import posterior_mean_scaling_factor

    folder = Path(ingested) / "nodules" / f"split={split}"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no {split!r} crops to compute the VAE scaling factor from")

    def batches():
        for record_batch in pads.dataset(str(folder), format="parquet").to_batches(
            columns=["crop"], batch_size=batch_size
        ):
            crops = np.stack([np.asarray(c, np.float32) for c in record_batch.column("crop").to_pylist()])
            if crops.ndim == 2:  # tensor extension not registered in this process: flat rows
                side = int(round(crops.shape[1] ** 0.5))
                crops = crops.reshape(len(crops), side, side)
            yield torch.from_numpy(crops)[:, None]

    vae.eval()
    return posterior_mean_scaling_factor(vae, batches())


def validate_vae(engine, batches, max_rows: int, cases: int):
    """Reconstruction L1 (posterior mean, no sampling), probe AUROC when both classes are
    present (scikit-learn), and an input | reconstruction grid."""
    import torch
    from sklearn.metrics import roc_auc_score

    from cohortcast.training.image_grid import image_grid

    device = next(engine.module.parameters()).device
    l1, labels, scores, shown, seen = 0.0, [], [], None, 0
    for batch in batches:
        images = torch.from_numpy(np.asarray(batch["image"], np.float32)).to(device)
        out = engine.module(images, sample=False)
        l1 += float((out.reconstruction.float() - images).abs().mean()) * images.shape[0]
        labels += [int(v) for v in batch["label"]]
        scores += out.probe_logit.float().cpu().tolist()
        shown = shown or (images[:cases], out.reconstruction[:cases])
        seen += images.shape[0]
        if seen >= max_rows:
            break
    if not seen:
        return {}, {}
    metrics = {"reconstruction_l1": l1 / seen}
    known = [(y, s) for y, s in zip(labels, scores) if y >= 0]
    if len({y for y, _ in known}) == 2:
        metrics["probe_auroc"] = float(roc_auc_score([y for y, _ in known], [s for _, s in known]))
    return metrics, {"input_reconstruction": image_grid(list(shown))}


def vae_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; config: {"stage": StageConfig, "model": VAEConfig,
    optional "validation": ValidationConfig, "tracking"}."""
    from cohortcast.models.vae import NoduleVAE
    from cohortcast.models.vae_loss import build_perceptual, vae_loss
    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    stage: StageConfig = config["stage"]
    model_cfg: VAEConfig = config["model"]
    perceptual = build_perceptual(model_cfg.loss)

    def loss_fn(engine, batch):
        if perceptual is not None:
            perceptual.to(batch["image"].device)
        out = engine(batch["image"])
        return vae_loss(out, batch["image"], batch["features"], batch["label"], model_cfg.loss, perceptual)

    hooks = StageHooks(tracking=config.get("tracking"))
    val = config.get("validation")
    if val is not None:
        hooks.validate = lambda engine, batches: validate_vae(engine, batches, val.max_rows, val.cases)
        hooks.validate_every_epochs = val.every_epochs
    run_stage_loop(stage, lambda: NoduleVAE(model_cfg), loss_fn, hooks)
