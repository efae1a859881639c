"""The latent cache (stage b): every ingested nodule crop encoded once by the frozen
VAE, on a Ray Data actor pool (each actor loads the VAE once), written as sharded
Parquet next to the ids, dates, EHR and labels. The folder name is a hash of the VAE
weights and the ingestion fingerprint: a rerun with the same VAE and data reuses it,
a retrained VAE or re-ingested data gets a new cache."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.io.atomic import atomic_folder, write_text_atomic

log = logging.getLogger(__name__)

CARD = "card.json"
CACHE_FORMAT = 2  # 2: latent_d8 (8 orientations) next to latent; part of the key


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_data_key(cache_format: int, model_files: list[Path], ingested: str | Path) -> str:
    """16 hex digits of (format, the model's files' contents, the ingestion fingerprint):
    what a cache of that model's outputs over that data is valid for. Shared by the study
    latent cache (inference.study_latent_cache)."""
    ingest_card = json.loads((Path(ingested) / CARD).read_text())
    digests = ":".join(_file_sha256(Path(f)) for f in model_files)
    blob = f"{cache_format}:{digests}:{ingest_card['fingerprint']}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_key(vae_folder: str | Path, ingested: str | Path) -> str:
    from cohortcast.models.vae import VAE_CONFIG_FILE, VAE_WEIGHTS_FILE

    return model_data_key(
        CACHE_FORMAT, [Path(vae_folder) / VAE_WEIGHTS_FILE, Path(vae_folder) / VAE_CONFIG_FILE], ingested
    )


def actor_cpus(actors: int, use_gpu: bool) -> float:
    """CPUs each encoding actor reserves. Leave one whole CPU for the read/list/write tasks
    (each asks for 1 CPU): actors holding more starve them and the pipeline never
    finishes (seen on a 2-CPU machine)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    return 0 if use_gpu else max(0.1, min(1.0, (cpus - 1.0) / actors))


def reuse_or_build(target: Path, build: Callable[[Path], dict[str, Any]], what: str = "latent cache") -> dict[str, Any]:
    """The cache card (with "path" and "reused") of `target` when it is complete, else
    `build(tmp)` writes the cache's tables into a temp folder and returns its card, which
    is written last and the folder renamed into place (an interrupted build leaves none)."""
    if (target / CARD).is_file():
        log.info("%s %s is valid for this model and data; reusing it", what, target)
        return {**json.loads((target / CARD).read_text()), "path": str(target), "reused": True}
    with atomic_folder(target, overwrite=True) as tmp:
        card = build(tmp)
        write_text_atomic(tmp / CARD, json.dumps(card, indent=2))
    return {**card, "path": str(target), "reused": False}


class LatentEncoder:
    """Ray Data actor: crops (B, H, W) -> diffusion latents: `latent` (B, c, h, w) of the
    crop as ingested and `latent_d8` (B, 8, c, h, w) of its 8 orientations
    (data.transforms.dihedral_orientation; index 0 is the crop as ingested), so training
    can augment by rotation without re-encoding (NAMD App. B)."""

    def __init__(self, vae_folder: str, device: str = "cpu"):
        import torch

        from cohortcast.models.vae import load_vae

        self.torch = torch
        self.device = torch.device(device)
        self.vae = load_vae(vae_folder).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cohortcast.data.transforms import NUM_ORIENTATIONS, dihedral_orientation

        crops = np.asarray(batch["crop"], dtype=np.float32)
        views = np.stack([dihedral_orientation(crops, k) for k in range(NUM_ORIENTATIONS)], axis=1)  # (B, 8, H, W)
        images = self.torch.from_numpy(np.ascontiguousarray(views).reshape(-1, 1, *crops.shape[1:])).to(self.device)
        with self.torch.no_grad():
            latents = self.vae.encode_for_diffusion(images).float().cpu().numpy()
        latents = latents.reshape(len(crops), NUM_ORIENTATIONS, *latents.shape[1:])
        if not np.isfinite(latents).all():
            raise ValueError("the VAE produced non-finite latents; refusing to write them to the cache")
        batch["latent"], batch["latent_d8"] = np.ascontiguousarray(latents[:, 0]), latents
        del batch["patch"]
        return batch


def build_latent_cache(
    ingested: str | Path,
    vae_folder: str | Path,
    cache_root: str | Path,
    actors: int = 2,
    batch_size: int = 64,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Returns the cache card (with "path" and "reused")."""
    import ray.data

    key = cache_key(vae_folder, ingested)

    def build(tmp: Path) -> dict[str, Any]:
        ds = ray.data.read_parquet(str(Path(ingested) / "nodules"))
        encoded = ds.map_batches(
            LatentEncoder,
            fn_constructor_args=(str(vae_folder), "cuda" if use_gpu else "cpu"),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus(actors, use_gpu),
            num_gpus=1 if use_gpu else 0,
            batch_format="numpy",
        )
        encoded.write_parquet(str(tmp / "nodules"), partition_cols=["split"])
        rows = ray.data.read_parquet(str(tmp / "nodules")).count()
        return {"key": key, "vae": str(vae_folder), "ingested": str(ingested), "rows": rows}

    return reuse_or_build(Path(cache_root) / f"latents-{key}", build)
