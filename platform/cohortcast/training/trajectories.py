"""Longitudinal training rows for stage d, from the latent cache.

One row per (patient, nodule) trajectory: its exams sorted by date, padded to
`max_exams + 1` (at most `max_exams` priors plus a target; older exams beyond that are
dropped). Each epoch, `sample_targets` draws a fresh target exam per trajectory among
its follow-ups (CLDM Sec. 3): the priors are every exam before it, the baseline the
latest prior (channel-concatenated to the noisy latent), the horizon the time from
that prior to the target. It also draws one of the 8 orientations per trajectory
(NAMD App. B rotations; without them the conditional stage memorised its training
set): every exam of the trajectory is seen in that orientation, latents from the
cache's `latent_d8`, crops rotated to match. A trajectory with one exam has nothing to
forecast and is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cohortcast.data.manifest import EHR_FEATURES, plain_value


def make_trajectory(group: dict[str, np.ndarray], max_exams: int) -> dict[str, np.ndarray]:
    """Ray Data `map_groups` function: all cache rows of one nodule -> one trajectory row."""
    order = np.argsort(np.asarray(group["days_since_baseline"]), kind="stable")[-(max_exams + 1) :]
    n, slots = len(order), max_exams + 1
    views = "latent_d8" if "latent_d8" in group else "latent"  # (n, 8, c, h, w) or (n, c, h, w)
    latents, crops = np.asarray(group[views], np.float32)[order], np.asarray(group["crop"], np.float32)[order]
    if views == "latent":
        latents = latents[:, None]  # one orientation: the crop as ingested
    padded_latents = np.zeros((1, slots, *latents.shape[1:]), np.float32)
    padded_crops = np.zeros((1, slots, *crops.shape[1:]), np.float32)
    padded_latents[0, :n], padded_crops[0, :n] = latents, crops
    days = np.zeros((1, slots), np.float32)
    days[0, :n] = np.asarray(group["days_since_baseline"], np.float32)[order]
    records = [{k: plain_value(group[k][i]) for k in EHR_FEATURES} for i in order]
    labels = np.asarray(group["malignant"], np.int64)
    return {
        "patient": np.asarray([group["patient"][0]]),
        "nodule_id": np.asarray([group["nodule_id"][0]]),
        "num_exams": np.asarray([n], np.int64),
        "days": days,
        "latents": padded_latents,
        "crops": padded_crops,
        "ehr_json": np.asarray([json.dumps(records)]),
        "malignant": np.asarray([labels.max()], np.int64),
    }


def trajectory_dataset(cache: str | Path, split: str, max_exams: int, data_cpus: float = 0.5):
    """Ray Dataset of the split's trajectories with at least one follow-up, streamed from
    the cache's trajectory table, or None if the split has none (e.g. a tiny cohort with
    no validation patient).

    Grouping exams into trajectories is a shuffle over the whole split: it runs once,
    before any Train worker holds a CPU, and its result is written beside the latents
    (`<cache>/trajectories/max_exams=K/split=S/`, atomically; the cache folder is keyed by
    its content, so the table never goes stale). Training then streams it like any other
    Parquet (training/data_streaming.py) instead of holding it in the object store."""
    from cohortcast.training.data_streaming import stream_parquet

    folder = Path(cache) / "nodules" / f"split={split}"
    if not folder.is_dir():
        return None
    table = Path(cache) / "trajectories" / f"max_exams={max_exams}" / f"split={split}"
    if not (table / DONE).is_file():
        _write_trajectory_table(folder, table, max_exams)
    if not any(table.glob("*.parquet")):
        return None
    return stream_parquet(table, None, data_cpus)


ROWS_PER_PARTITION = 5000
DONE = "_COMPLETE"  # written last inside the table folder: its presence means complete


def _write_trajectory_table(folder: Path, table: Path, max_exams: int) -> None:
    import pyarrow.dataset as pads
    import ray.data

    from cohortcast.errors import OutputExistsError
    from cohortcast.io.atomic import atomic_folder

    # Ray's default of 200 shuffle partitions costs tiny cohorts seconds of empty tasks;
    # ~5000 exam rows (~60 MB at the debug sizes) per partition, 1 to 200 of them.
    rows = pads.dataset(str(folder), format="parquet").count_rows()
    partitions = int(min(200, max(1, rows // ROWS_PER_PARTITION + 1)))
    trajectories = (
        ray.data.read_parquet(str(folder))
        .groupby(["patient", "nodule_id"], num_partitions=partitions)
        .map_groups(make_trajectory, fn_kwargs={"max_exams": max_exams}, batch_format="numpy")
        .filter(lambda row: row["num_exams"] >= 2)
    )
    try:
        with atomic_folder(table) as tmp:
            trajectories.write_parquet(str(tmp))
            (tmp / DONE).write_text("")
    except OutputExistsError:  # another process finished the same table first: use it
        if not (table / DONE).is_file():
            raise


def sample_targets(batch: dict[str, np.ndarray], rng: np.random.Generator, augment: bool = True) -> dict:
    """Trajectory rows -> one (priors, baseline, target) example each, target (and, with
    `augment`, orientation) drawn by `rng`; without `augment` the crops as ingested."""
    import torch

    from cohortcast.data.transforms import dihedral_orientation

    n = np.asarray(batch["num_exams"])
    rows = len(n)
    target = rng.integers(1, n)  # a follow-up: index in 1..n-1
    all_views, crops, days = (np.asarray(batch[k], np.float32) for k in ("latents", "crops", "days"))
    idx = np.arange(rows)
    orientation = rng.integers(0, all_views.shape[2], rows) if augment else np.zeros(rows, np.int64)
    latents = all_views[idx, :, orientation]  # (B, slots, c, h, w)
    crops = np.stack([dihedral_orientation(c, int(o)) for c, o in zip(crops, orientation)])
    slots = latents.shape[1] - 1  # prior slots (= max_exams)
    prior_mask = np.arange(slots)[None, :] < target[:, None]
    target_days = days[idx, target]
    days_before = np.where(prior_mask, target_days[:, None] - days[:, :slots], 0.0).astype(np.float32)
    records = [json.loads(t)[j - 1] for t, j in zip(batch["ehr_json"], target)]
    return {
        "prior_latents": torch.from_numpy(latents[:, :slots] * prior_mask[:, :, None, None, None]),
        "prior_crops": torch.from_numpy(
            np.ascontiguousarray(crops[:, :slots, None] * prior_mask[:, :, None, None, None])
        ),
        "days_before_target": torch.from_numpy(days_before),
        "exam_mask": torch.from_numpy(prior_mask),
        "baseline": torch.from_numpy(latents[idx, target - 1]),
        "baseline_crop": torch.from_numpy(np.ascontiguousarray(crops[idx, target - 1][:, None])),
        "target": torch.from_numpy(latents[idx, target]),
        "target_crop": torch.from_numpy(np.ascontiguousarray(crops[idx, target][:, None])),
        "horizon_days": torch.from_numpy((target_days - days[idx, target - 1]).astype(np.float32)),
        "label": torch.from_numpy(np.asarray(batch["malignant"], np.float32)),
        "ehr": records,
        "orientation": torch.from_numpy(orientation.astype(np.int64)),
        "case_id": [f"{p}/{q}" for p, q in zip(batch["patient"], batch["nodule_id"])],
    }
