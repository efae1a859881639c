"""The study latent cache (CLDM): every ingested study, CT volume or radiograph, through
the frozen universal encoder once, on a Ray Data actor pool (each actor loads the
encoder once), written as Parquet next to the ids, dates and the measures part 2's
decoders and metrics need. Keyed like the NAMD latent cache (inference.latent_cache,
whose key and reuse logic it shares): the folder is named after a hash of the encoder's
weights and config and the ingestion fingerprint, so a rerun with the same encoder and
data reuses it and a retrained encoder or re-ingested data gets a new one.

Layout (`latents-<key>/`):

    studies/dims=3/split=*/...parquet   CT volumes: cls (dim,), tokens (N3, dim)
    studies/dims=2/split=*/...parquet   radiographs: cls (dim,), tokens (N2, dim)
    card.json                           key, encoder, ingested, rows and token shapes

Volumes and radiographs have different token counts, hence one table each (hive
partitions: reading `studies/dims=3` restores `dims` and `split` from the folders)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.errors import MissingInputError
from cohortcast.inference.latent_cache import actor_cpus, model_data_key, reuse_or_build

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
STUDIES = "studies"
IMAGE_COLUMN = {3: "volume", 2: "radiograph"}  # dims -> the ingested image column
# Carried from the ingested rows: ids, dates and what part 2's decoders and metrics read
# (masks' and lungs' volumes for aVD, report text for the report decoder).
KEEP = (
    "patient",
    "study",
    "split",
    "study_date",
    "days_since_baseline",
    "exam_index",
    "num_exams",
    "modality",
    "dims",
    "has_mask",
    "lung_voxels",
    "mask_volume_ml",
    "lung_volume_ml",
    "report_text",
)


def encoder_files(encoder_folder: str | Path) -> list[Path]:
    """The files that define a saved encoder: its config and its weights."""
    from cohortcast.models.encoder_weights import CONFIG_FILE, WEIGHTS_FILES

    folder = Path(encoder_folder)
    weights = [folder / name for name in WEIGHTS_FILES if (folder / name).is_file()]
    if not (folder / CONFIG_FILE).is_file() or not weights:
        raise MissingInputError(f"{folder}: not a saved universal encoder (needs {CONFIG_FILE} and weights)")
    return [folder / CONFIG_FILE, weights[0]]


def cache_key(encoder_folder: str | Path, ingested: str | Path) -> str:
    return model_data_key(CACHE_FORMAT, encoder_files(encoder_folder), ingested)


class StudyTokenEncoder:
    """Ray Data actor: ingested study rows of one dimensionality -> `cls` (B, dim), the
    [CLS] token (the study embedding z_d), and `tokens` (B, N, dim), the patch tokens;
    the image column itself is dropped (the ingested table keeps it)."""

    def __init__(self, encoder_folder: str, dims: int, device: str = "cpu"):
        import torch

        from cohortcast.models.universal_encoder import UniversalEncoder

        self.torch = torch
        self.device = torch.device(device)
        self.encoder = UniversalEncoder.load(encoder_folder).to(self.device)
        self.column = IMAGE_COLUMN[dims]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = self.torch.from_numpy(np.ascontiguousarray(batch[self.column], dtype=np.float32)[:, None])
        with self.torch.no_grad():
            tokens = self.encoder.tokens(images.to(self.device)).float().cpu().numpy()
        if not np.isfinite(tokens).all():
            raise ValueError("the encoder produced non-finite tokens; refusing to write them to the cache")
        out = {k: batch[k] for k in KEEP if k in batch}
        out["cls"], out["tokens"] = np.ascontiguousarray(tokens[:, 0]), np.ascontiguousarray(tokens[:, 1:])
        return out


def _columns(ingested: Path) -> list[str]:
    import pyarrow.dataset as pads

    return pads.dataset(str(ingested / STUDIES), format="parquet", partitioning="hive").schema.names


def build_study_latent_cache(
    ingested: str | Path,
    encoder_folder: str | Path,
    cache_root: str | Path,
    actors: int = 2,
    batch_size: int = 16,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """Returns the cache card (with "path" and "reused"): "rows" {dims: count} and
    "tokens" {dims: [N, dim]} for each dimensionality the cohort has."""
    import ray.data
    from ray.data.expressions import col

    ingested = Path(ingested)
    key = cache_key(encoder_folder, ingested)

    def build(tmp: Path) -> dict[str, Any]:
        available = _columns(ingested)
        if "dims" not in available:
            raise MissingInputError(
                f"{ingested}: its studies table has no `dims` column (ingested by an older cohortcast); "
                "ingest the cohort again (ingest.overwrite=true)"
            )
        card: dict[str, Any] = {
            "key": key,
            "encoder": str(encoder_folder),
            "ingested": str(ingested),
            "rows": {},
            "tokens": {},
        }
        for dims, column in IMAGE_COLUMN.items():
            columns = [c for c in KEEP if c in available] + [column]
            rows = (
                ray.data.read_parquet(str(ingested / STUDIES)).select_columns(columns).filter(expr=col("dims") == dims)
            )
            encoded = rows.map_batches(
                StudyTokenEncoder,
                fn_constructor_args=(str(encoder_folder), dims, "cuda" if use_gpu else "cpu"),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=actor_cpus(actors, use_gpu),
                num_gpus=1 if use_gpu else 0,
                batch_format="numpy",
            )
            # dims and split become the folders (and come back from them when read)
            encoded.write_parquet(str(tmp / STUDIES), partition_cols=["dims", "split"])
            folder = tmp / STUDIES / f"dims={dims}"
            if not folder.is_dir():
                log.warning("study latent cache: the cohort has no %dD studies", dims)
                continue
            written = ray.data.read_parquet(str(folder))
            first = written.take(1)[0]
            card["rows"][str(dims)] = written.count()
            card["tokens"][str(dims)] = list(np.asarray(first["tokens"]).shape)
        if not card["rows"]:
            raise MissingInputError(f"{ingested}: no studies to encode")
        log.info(
            "study latent cache: %s",
            ", ".join(f"{n} {d}D studies as {card['tokens'][d]} tokens" for d, n in card["rows"].items()),
        )
        return card

    return reuse_or_build(Path(cache_root) / f"latents-{key}", build, "study latent cache")
