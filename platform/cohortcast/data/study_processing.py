"""What ingestion does to one study, as a pure function of (task, config): read it,
extract nodule crops and patches and a fixed-shape volume (+ lesion mask), or say
why it cannot. Ray Data maps this over the cohort; the benchmark's plain loop calls
it directly, so both measure the same work."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cohortcast.config import IngestConfig
from cohortcast.data.errors import NonFiniteVoxelsError, SliceGeometryError, StudyError
from cohortcast.data.limits import MB
from cohortcast.data.readers import ReadLimits, read_study
from cohortcast.data.transforms import check_inside, nodule_crop, patch_3d, resample_to_shape, window

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
        "has_mask": False,
        "crops": np.zeros((0, cfg.crop_size, cfg.crop_size), np.float32),
        "crop_affines": np.zeros((0, 16), np.float64),  # each crop's grid in patient space, flattened 4x4
        "patches": np.zeros((0,) + (cfg.patch_size,) * 3, np.float32),
        "volume": np.zeros(cfg.volume_shape, np.float32),
        "mask": np.zeros(cfg.volume_shape, np.uint8),
        "source_shape": np.zeros(3, np.int64),
        "source_affine": np.zeros(16, np.float64),
        "volume_affine": np.zeros(16, np.float64),
    }


# Tensor columns of a result; none may hold NaN/Inf when it reaches Parquet.
TENSOR_COLUMNS = ("crops", "crop_affines", "patches", "volume", "mask", "source_affine", "volume_affine")


def relative_message(message: str, task: dict) -> str:
    """Readers name the absolute paths they opened; outputs name the manifest's
    relative paths (folder names above them may hold identifiers)."""
    pairs = [(task.get("mask_path") or "", task.get("mask_path_rel") or ""), (task["path"], task["rel_path"])]
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

    if cfg.include_volumes and volume.shape[0] > 1:
        resampled = resample_to_shape(volume, cfg.volume_shape)
        result["volume"] = window(resampled.array, lo, hi, cfg.normalise)
        result["volume_affine"] = resampled.affine.reshape(-1)
        if task.get("mask_path"):
            try:
                mask = read_study(task["mask_path"], modality="SEG", limits=limits)
                if mask.shape != volume.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
                    raise SliceGeometryError(
                        task["mask_path_rel"], f"mask grid {mask.shape} does not match the image grid {volume.shape}"
                    )
            except StudyError as exc:
                return _quarantine(result, exc, task)
            result["mask"] = (resample_to_shape(mask, cfg.volume_shape, order=0, cval=0).array > 0.5).astype(np.uint8)
            result["has_mask"] = True
    return _guard_finite(result, task)


def _guard_finite(result: dict, task: dict) -> dict:
    """The last check before the Parquet writer: readers refuse non-finite voxels, so
    this fires only if a transform makes one; the study is quarantined, not written."""
    bad = non_finite_columns(result)
    if bad:
        return _quarantine(
            result, NonFiniteVoxelsError(task["rel_path"], f"non-finite values in the computed {', '.join(bad)}"), task
        )
    return result
