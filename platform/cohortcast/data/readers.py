"""One entry point for any study path: DICOM series folder, DICOM file or NIfTI.

read_study raises only StudyError subclasses (a reader bug surfaces as the base
StudyError, reason `unreadable`, naming the exception type), and what it returns has
finite voxels and a finite, invertible affine."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from cohortcast.data.dicom_reader import read_dicom_file, read_dicom_series
from cohortcast.data.errors import NonFiniteVoxelsError, SliceGeometryError, StudyError, from_os_error
from cohortcast.data.limits import ReadLimits
from cohortcast.data.nifti_reader import is_nifti, read_nifti
from cohortcast.io.volume import Volume

__all__ = ["ReadLimits", "read_study"]


def _is_dir(path: Path) -> bool:
    """stat() follows links: a loop, a dangling link or a forbidden parent folder
    raises here, named, instead of looking like a missing path."""
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError as exc:
        raise from_os_error(path, exc, "study path") from None


def _read(path: Path, modality: str, limits: ReadLimits) -> Volume:
    if _is_dir(path):
        return read_dicom_series(path, modality=modality, limits=limits)
    if is_nifti(path):
        return read_nifti(path, modality=modality, limits=limits)
    return read_dicom_file(path, modality=modality, limits=limits)


def require_finite(array: np.ndarray, where, what: str = "voxels") -> None:
    """NaN/Inf would flow into every crop, patch and volume cut from the image (and
    through windowing, which clips Inf but keeps NaN): refuse them at the source."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise NonFiniteVoxelsError(where, f"{bad} of {finite.size} {what} are NaN or infinite")


def read_study(path: str | Path, modality: str = "CT", limits: ReadLimits | None = None) -> Volume:
    """Read a study, refusing it (StudyError) before allocating when its headers break
    `limits`, and when a DICOM Modality tag contradicts `modality`."""
    path = Path(path)
    limits = limits or ReadLimits()
    try:
        volume = _read(path, modality, limits)
    except StudyError:
        raise
    except Exception as exc:  # a reader bug or an exotic file must still be a StudyError
        raise StudyError(path, f"could not be read ({type(exc).__name__})") from exc
    require_finite(volume.array, path)
    affine = volume.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SliceGeometryError(path, "affine is singular or not finite")
    return volume
