"""What ingestion does to one study, as a pure function of (task, config): read it,
extract nodule crops and patches and the whole study at a fixed size (a volume with its
lesion and lung masks, or a single-plane image as a radiograph), or say why it cannot.
Ray Data maps this over the cohort; the benchmark's plain loop calls it directly, so
both measure the same work."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cohortcast.config import IngestConfig
from cohortcast.data.errors import NonFiniteVoxelsError, SliceGeometryError, StudyError
from cohortcast.data.limits import MB
from cohortcast.data.radiograph import radiograph_image
from cohortcast.data.readers import ReadLimits, read_study
from cohortcast.data.transforms import check_inside, nodule_crop, patch_3d, resample_to_shape, window
from cohortcast.io.volume import Volume

OK, QUARANTINED = "ok", "quarantined"


def _empty_result(task: dict, cfg: IngestConfig) -> dict[str, Any]:
    return {
        **{
            k: task[k]
            for k in (
                "patient",
                "study",
                "split",
                "study_date",
                "days_since_baseline",
                "exam_index",
                "num_exams",
                "modality",
                "report_text",
                "rel_path",
            )
        },
        "status": OK,
        "reason": "",
        "message": "",
        "findings_json": "[]",
        "dims": np.int8(task.get("dims", 3)),  # the listed modality's; the image read decides
        "has_mask": False,
        "has_lung_mask": False,
        "lung_voxels": np.int64(0),  # lung voxels of the resampled `lung_mask`
        "lung_volume_ml": 0.0,  # lung and lesion volumes measured on the source grid
        "mask_volume_ml": 0.0,
        "crops": np.zeros((0, cfg.crop_size, cfg.crop_size), np.float32),
        "crop_affines": np.zeros((0, 16), np.float64),  # each crop's grid in patient space, flattened 4x4
        "patches": np.zeros((0,) + (cfg.patch_size,) * 3, np.float32),
        "volume": np.zeros(cfg.volume_shape, np.float32),
        "mask": np.zeros(cfg.volume_shape, np.uint8),
        "lung_mask": np.zeros(cfg.volume_shape, np.uint8),
        "radiograph": np.zeros((cfg.radiograph_size, cfg.radiograph_size), np.float32),
        "radiograph_affine": np.zeros(16, np.float64),  # (column, row, 0, 1) -> LPS mm, flattened 4x4
        "source_shape": np.zeros(3, np.int64),
        "source_affine": np.zeros(16, np.float64),
        "volume_affine": np.zeros(16, np.float64),
    }


# Tensor columns of a result; none may hold NaN/Inf when it reaches Parquet.
TENSOR_COLUMNS = (
    "crops",
    "crop_affines",
    "patches",
    "volume",
    "mask",
    "lung_mask",
    "source_affine",
    "volume_affine",
    "radiograph",
    "radiograph_affine",
    "lung_volume_ml",
    "mask_volume_ml",
)
# The study's masks: (task path key, label, result mask column, has_ column, volume column).
MASKS = (
    ("mask_path", "mask", "mask", "has_mask", "mask_volume_ml"),
    ("lung_mask_path", "lung mask", "lung_mask", "has_lung_mask", "lung_volume_ml"),
)


def relative_message(message: str, task: dict) -> str:
    """Readers name the absolute paths they opened; outputs name the manifest's
    relative paths (folder names above them may hold identifiers)."""
    pairs = [(task.get(key) or "", task.get(f"{key}_rel") or "") for key, *_ in MASKS]
    pairs.append((task["path"], task["rel_path"]))
    for absolute, relative in sorted(pairs, key=lambda p: -len(p[0])):  # longest first: one may contain the other
        if absolute:
            message = message.replace(absolute, relative)
    return message


def _quarantine(result: dict, exc: StudyError, task: dict) -> dict:
    result.update(status=QUARANTINED, reason=exc.reason, message=relative_message(str(exc), task))
    return result


def read_limits(cfg: IngestConfig) -> ReadLimits:
    return ReadLimits(
        max_voxels=cfg.max_voxels, max_uncompressed_bytes=cfg.max_uncompressed_mb * MB, config_section="ingest"
    )


def non_finite_columns(result: dict) -> list[str]:
    return [k for k in TENSOR_COLUMNS if not np.isfinite(np.asarray(result[k])).all()]


def process_study(task: dict, cfg: IngestConfig) -> dict[str, Any]:
    """One manifest study -> one result row (see _empty_result for its columns)."""
    result = _empty_result(task, cfg)
    lo, hi = cfg.hu_window
    limits = read_limits(cfg)
    try:
        volume = read_study(task["path"], modality=task["modality"], limits=limits)
    except StudyError as exc:
        return _quarantine(result, exc, task)
    except Exception as exc:  # a reader bug or an exotic file must not stop the cohort
        return _quarantine(result, StudyError(task["rel_path"], f"unexpected {type(exc).__name__}: {exc}"), task)
    result["source_shape"] = np.array(volume.shape, np.int64)
    result["source_affine"] = volume.affine.reshape(-1)

    findings, crops, crop_affines, patches = [], [], [], []
    for finding in json.loads(task["findings_json"]):
        centre = np.array([finding["center_x_mm"], finding["center_y_mm"], finding["center_z_mm"]])
        try:
            check_inside(volume, centre, f"{task['rel_path']} nodule {finding['nodule_id']}")
        except StudyError as exc:
            findings.append(
                {**finding, "status": QUARANTINED, "reason": exc.reason, "message": relative_message(str(exc), task)}
            )
            continue
        crop = nodule_crop(volume, centre, cfg.crop_size, cfg.crop_spacing_mm)
        crops.append(window(crop.array, lo, hi, cfg.normalise))
        crop_affines.append(crop.affine.reshape(-1))
        patches.append(window(patch_3d(volume, centre, cfg.patch_size, cfg.patch_spacing_mm), lo, hi, cfg.normalise))
        findings.append({**finding, "status": OK})
    result["findings_json"] = json.dumps(findings)
    if crops:
        result["crops"], result["patches"] = np.stack(crops), np.stack(patches)
        result["crop_affines"] = np.stack(crop_affines)

    result["dims"] = np.int8(2 if volume.shape[0] == 1 else 3)
    if cfg.include_volumes and result["dims"] == 3:
        try:
            _whole_volume(result, volume, task, cfg, limits)
        except StudyError as exc:
            return _quarantine(result, exc, task)
    elif cfg.include_volumes:
        # Masks of a single-plane image are not read: the masks are 3D (lesion and lung volumes).
        image = radiograph_image(volume, cfg.radiograph_size, antialias=cfg.antialias)
        result["radiograph"], result["radiograph_affine"] = image.array, image.affine.reshape(-1)
    return _guard_finite(result, task)


def voxel_ml(volume: Volume) -> float:
    """One voxel's volume in millilitres, from the affine (any orientation or shear)."""
    return abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0


def _read_mask(task: dict, key: str, label: str, volume: Volume, limits: ReadLimits) -> Volume:
    mask = read_study(task[key], modality="SEG", limits=limits)
    where = task[f"{key}_rel"]
    if mask.shape != volume.shape:
        raise SliceGeometryError(where, f"{label} grid {mask.shape} does not match the image grid {volume.shape}")
    if not np.allclose(mask.affine, volume.affine, atol=1e-3):
        worst = float(np.abs(mask.affine - volume.affine).max())
        raise SliceGeometryError(
            where, f"{label} affine differs from the image's (by up to {worst:.3g} mm): it is on another grid"
        )
    return mask


def _whole_volume(result: dict, volume: Volume, task: dict, cfg: IngestConfig, limits: ReadLimits) -> None:
    """The volume at `volume_shape` (anti-aliased when cfg.antialias), its masks
    nearest-neighbour on the same grid, mask volumes on the source grid."""
    lo, hi = cfg.hu_window
    resampled = resample_to_shape(volume, cfg.volume_shape, antialias=cfg.antialias)
    result["volume"] = window(resampled.array, lo, hi, cfg.normalise)
    result["volume_affine"] = resampled.affine.reshape(-1)
    for key, label, column, flag, ml in MASKS:
        if not task.get(key):
            continue
        mask = _read_mask(task, key, label, volume, limits)
        result[ml] = float(np.count_nonzero(mask.array > 0.5)) * voxel_ml(volume)
        small = resample_to_shape(mask, cfg.volume_shape, order=0, cval=0, antialias=False)
        result[column] = (small.array > 0.5).astype(np.uint8)
        result[flag] = True
    result["lung_voxels"] = np.int64(np.count_nonzero(result["lung_mask"]))


def _guard_finite(result: dict, task: dict) -> dict:
    """The last check before the Parquet writer: readers refuse non-finite voxels, so
    this fires only if a transform makes one; the study is quarantined, not written."""
    bad = non_finite_columns(result)
    if bad:
        return _quarantine(
            result, NonFiniteVoxelsError(task["rel_path"], f"non-finite values in the computed {', '.join(bad)}"), task
        )
    return result
