"""CLDM stage `encoder`: masked-image-modelling pre-training of the universal encoder on
CT volumes and chest radiographs together (UniMiSS), on Ray Train + DeepSpeed through
the shared stage loop (checkpoints, resume, rank-0 progress lines, MLflow).

Every optimizer step draws, per worker, one batch of `micro_batch_3d` volumes and one of
`micro_batch_2d` radiographs: two datasets with their own batch sizes, because a volume
costs far more memory and time than a radiograph (one shared batch size is what UniMiSS
users fight with). The loss is `weight_3d * L3d + weight_2d * L2d`, each term the
encoder's MIM loss on its batch. An epoch is one pass over the volumes (the radiographs
when there are none); the other kind's stream restarts whenever it runs out, so neither
kind's tail is skipped and epochs keep their meaning. A split without one kind trains
on the other alone (with a warning).

Datasets ("train_3d", "train_2d": sharded; "val_3d", "val_2d": rank 0) hold one column,
`image`, read from the ingested studies table filtered by `dims`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.config.cldm import EncoderConfig, EncoderStageConfig, EncoderValidationConfig
from cohortcast.errors import CohortcastError

log = logging.getLogger(__name__)

IMAGE_COLUMN = {3: "volume", 2: "radiograph"}  # dims -> the ingested studies column
KIND = {3: "volumes", 2: "radiographs"}
BATCH_DIMS = {"image_3d": 3, "image_2d": 2}  # a step's (or validation batch's) keys


class EncoderDataError(CohortcastError, ValueError):
    """The ingested cohort cannot feed the encoder stage as configured."""


def micro_batch(stage: EncoderStageConfig, dims: int) -> int:
    return stage.micro_batch_3d if dims == 3 else stage.micro_batch_2d


def loss_weight(stage: EncoderStageConfig, dims: int) -> float:
    return stage.weight_3d if dims == 3 else stage.weight_2d


def study_count(ingested: str | Path, split: str, dims: int) -> int:
    """Studies of one dimensionality in the split, from the `dims` column alone."""
    import pyarrow.dataset as pads

    folder = Path(ingested) / "studies" / f"split={split}"
    if not folder.is_dir():
        return 0
    return pads.dataset(str(folder), format="parquet").count_rows(filter=pads.field("dims") == dims)


def study_images(ingested: str | Path, split: str, dims: int, limit: int | None = None, data_cpus: float = 0.5):
    """The split's studies of one dimensionality as rows {"image": (D, H, W) | (H, W)},
    streamed while the workers train (training/data_streaming.py); None when there are
    none (counted from the `dims` column alone, without reading any image)."""
    import pyarrow.dataset as pads

    from cohortcast.training.data_streaming import stream_parquet

    if study_count(ingested, split, dims) == 0:
        return None
    folder = Path(ingested) / "studies" / f"split={split}"
    column = IMAGE_COLUMN[dims]
    # columns and the filter go into the read itself: no other column is loaded
    ds = stream_parquet(folder, [column], data_cpus, row_filter=pads.field("dims") == dims, rename={column: "image"})
    return ds.limit(limit) if limit is not None else ds


def _require_cldm_columns(ingested: Path) -> None:
    import pyarrow.dataset as pads

    folder = ingested / "studies"
    if not folder.is_dir():
        raise EncoderDataError(f"{ingested}: no studies table; ingest the cohort with volumes (ingest.include_volumes)")
    names = pads.dataset(str(folder), format="parquet", partitioning="hive").schema.names
    missing = [c for c in ("dims", *IMAGE_COLUMN.values()) if c not in names]
    if missing:
        raise EncoderDataError(
            f"{ingested}: the studies table has no {', '.join(missing)} column(s) (ingested by an older "
            "cohortcast); ingest the cohort again (ingest.overwrite=true)"
        )


def encoder_datasets(
    ingested: str | Path,
    stage: EncoderStageConfig,
    validation: EncoderValidationConfig,
    workers: int,
    data_cpus: float = 0.5,
) -> dict[str, Any]:
    """{"train_3d", "train_2d", "val_3d", "val_2d"}: None where a kind is absent (or its
    micro-batch is 0). Raises EncoderDataError when nothing is left to train on or a kind
    has fewer rows than one micro-batch per worker."""
    ingested = Path(ingested)
    _require_cldm_columns(ingested)
    out: dict[str, Any] = {}
    for dims in (3, 2):
        size = micro_batch(stage, dims)
        train = study_images(ingested, "train", dims, data_cpus=data_cpus) if size else None
        if size and train is None:
            log.warning(
                "encoder stage: the train split has no %s (dims %d): training on the other kind alone", KIND[dims], dims
            )
        rows = study_count(ingested, "train", dims) if train is not None else 0
        if train is not None and rows < size * workers:
            raise EncoderDataError(
                f"{ingested}: the train split has {rows} {KIND[dims]}, fewer than "
                f"micro_batch_{dims}d x workers ({size} x {workers}); lower cldm.training.encoder.micro_batch_{dims}d"
            )
        out[f"train_{dims}d"] = train
        out[f"val_{dims}d"] = (
            study_images(ingested, "val", dims, validation.max_rows, data_cpus) if train is not None else None
        )
    if out["train_3d"] is None and out["train_2d"] is None:
        raise EncoderDataError(
            f"{ingested}: nothing to pre-train the encoder on: the train split has no volumes with "
            f"micro_batch_3d {stage.micro_batch_3d} and no radiographs with micro_batch_2d {stage.micro_batch_2d}"
        )
    return out


class PairedBatches:
    """Each step's batches: one of `sizes[dims]` rows from every kind's shard, as float32
    tensors (B, 1, ...) under "image_3d" / "image_2d". The first kind in `shards` (volumes
    when present) sets the epoch: one pass over its shard; the other kinds' streams persist
    across epochs and restart when they run out. `shards`: Ray Data shards (anything with
    `iter_batches(batch_size=, drop_last=, batch_format=)`) by dims, rows {"image": ...}."""

    def __init__(self, shards: dict[int, Any], sizes: dict[int, int]):
        if not shards:
            raise ValueError("PairedBatches needs at least one shard")
        self.shards, self.sizes = shards, sizes
        self.primary, *others = list(shards)
        self._streams = {dims: self._forever(dims) for dims in others}

    def _pass(self, dims: int) -> Iterable[dict[str, np.ndarray]]:
        return self.shards[dims].iter_batches(batch_size=self.sizes[dims], drop_last=True, batch_format="numpy")

    def _forever(self, dims: int) -> Iterator[dict[str, np.ndarray]]:
        while True:
            empty = True
            for batch in self._pass(dims):
                empty = False
                yield batch
            if empty:
                raise RuntimeError(f"no full batch of {self.sizes[dims]} {KIND[dims]} in this worker's shard")

    def epoch(self, device=None, rng=None) -> Iterator[dict[str, Any]]:
        """One epoch's steps (`rng` unused: the MIM masks come from torch's seeded RNG)."""
        for batch in self._pass(self.primary):
            out = {f"image_{self.primary}d": _images(batch["image"], device)}
            for dims, stream in self._streams.items():
                out[f"image_{dims}d"] = _images(next(stream)["image"], device)
            yield out


def _images(array, device):
    import torch

    images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)[:, None])
    return images.to(device) if device is not None else images


def middle_slices(x):
    """(B, 1, D, H, W) -> (B, 1, H, W) at D // 2; 2D input unchanged (for PNG grids)."""
    return x[:, :, x.shape[2] // 2] if x.ndim == 5 else x


def reconstruction_grid(encoder, images, generator=None, low: float = -1.0) -> np.ndarray:
    """uint8 grid, one row per case: masked input | reconstruction | original (a volume
    shown by its middle slice)."""
    from cohortcast.training.image_grid import image_grid

    masked, reconstruction = encoder.reconstruct(images, generator)
    return image_grid([middle_slices(t) for t in (masked, reconstruction, images)], low=low)


def mean_patch_baseline(encoder, images) -> float:
    """The MIM loss of the trivial prediction "every patch is its own mean", averaged over
    all patches (what it is on a random mask, in expectation): for per-patch normalised
    targets (`norm_pix_loss`) the loss of predicting 0, just under 1 (0 for flat
    patches, e.g. a radiograph's padding); otherwise the patches' mean variance. A
    validation loss below it means the encoder predicts a masked patch's structure from
    the visible ones, not only its brightness."""
    from cohortcast.models.patch_embed import patchify

    patch = tuple(encoder.cfg.patch_3d if images.ndim == 5 else encoder.cfg.patch_2d)
    target = patchify(images.float(), patch)
    if encoder.cfg.norm_pix_loss:
        # the encoder's own target normalisation (MAE's norm_pix), so the two compare exactly
        return float(encoder._normalised(target)[0].pow(2).mean())
    return float(target.var(dim=-1, correction=0).mean())


def validate_encoder(
    engine,
    batches: Iterable[dict[str, np.ndarray]],
    weights: dict[int, float],
    cases: int,
    seed: int,
    low_3d: float = -1.0,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean MIM loss per kind on the validation rows ("mim_3d", "mim_2d"), under masks
    drawn from `seed` (the same masks at every validation: losses compare across steps),
    their weighted sum ("mim", like the training loss), each kind's trivial baseline on
    the same rows ("mim_3d_baseline", ...: mean_patch_baseline) and a reconstruction grid
    per kind. `batches`: {"image_3d": array} or {"image_2d": array} each."""
    import torch

    module = engine.module
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total: dict[int, float] = {}
    baseline: dict[int, float] = {}
    seen: dict[int, int] = {}
    grids: dict[str, np.ndarray] = {}
    for batch in batches:
        for key, array in batch.items():
            dims = BATCH_DIMS[key]
            images = _images(array, device)
            loss = float(module.mim_loss(images, generator))
            total[dims] = total.get(dims, 0.0) + loss * images.shape[0]
            baseline[dims] = baseline.get(dims, 0.0) + mean_patch_baseline(module, images) * images.shape[0]
            seen[dims] = seen.get(dims, 0) + images.shape[0]
            name = f"reconstruction_{dims}d"
            if name not in grids:
                shown = torch.Generator().manual_seed(seed)
                grids[name] = reconstruction_grid(module, images[:cases], shown, low_3d if dims == 3 else -1.0)
    metrics = {f"mim_{d}d": total[d] / seen[d] for d in total}
    if metrics:
        metrics["mim"] = sum(weights[d] * metrics[f"mim_{d}d"] for d in total)
    metrics.update({f"mim_{d}d_baseline": baseline[d] / seen[d] for d in baseline})
    return metrics, grids


def _shard(name: str):
    import ray.train

    try:
        return ray.train.get_dataset_shard(name)
    except KeyError:
        return None


def encoder_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; config: {"stage": EncoderStageConfig, "model":
    EncoderConfig, "validation": EncoderValidationConfig, optional "volume_low" (the
    volumes' intensity floor, -1 or 0, for the PNG grids), "tracking"}."""
    from cohortcast.models.universal_encoder import UniversalEncoder
    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    stage: EncoderStageConfig = config["stage"]
    model_cfg: EncoderConfig = config["model"]
    val: EncoderValidationConfig = config["validation"]
    shards = {d: s for d in (3, 2) if (s := _shard(f"train_{d}d")) is not None}
    sizes = {d: micro_batch(stage, d) for d in shards}
    weights = {d: loss_weight(stage, d) for d in (3, 2)}
    paired = PairedBatches(shards, sizes)

    def loss_fn(engine, batch):
        # engine(x) is the module's forward, the MIM loss: DeepSpeed's hooks run around it
        terms = {f"mim_{d}d": engine(batch[f"image_{d}d"]) for d in shards}
        return {"total": sum(weights[d] * terms[f"mim_{d}d"] for d in shards), **terms}

    val_shards = {d: s for d in (3, 2) if (s := _shard(f"val_{d}d")) is not None}

    def val_batches():
        for dims, shard in val_shards.items():
            # the first batch of each kind fills its grid: at least `cases` rows
            batch_size = max(val.cases, sizes.get(dims, 1))
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                yield {f"image_{dims}d": batch["image"]}

    at_step0: dict[str, float] = {}

    def validate(engine, batches):
        metrics, grids = validate_encoder(engine, batches, weights, val.cases, val.seed, config.get("volume_low", -1.0))
        if engine.global_steps == 0:  # the untrained encoder's losses travel with every later report
            at_step0.update({f"{k}_step0": v for k, v in metrics.items() if not k.endswith("_baseline")})
        return {**metrics, **at_step0}, grids

    hooks = StageHooks(
        tracking=config.get("tracking"),
        train_batches=paired.epoch,
        val_batches=val_batches,
        validate_every_epochs=val.every_epochs,
        validate=validate,
        validate_at_start=True,
    )
    # The step's samples (what DeepSpeed and the samples/s figure count): both batches.
    step_stage = dataclasses.replace(stage, micro_batch_size=sum(sizes.values()))
    run_stage_loop(step_stage, lambda: UniversalEncoder(model_cfg), loss_fn, hooks)
