"""NIfTI (.nii, .nii.gz) -> Volume via nibabel, with the affine kept (RAS -> LPS)."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from cohortcast.data.errors import CorruptFileError, MissingPathError, SliceGeometryError
from cohortcast.data.volume import RAS_TO_LPS, Volume


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: str | Path, modality: str = "CT") -> Volume:
    """Read a 2D or 3D NIfTI image (a 4D one with a single volume is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(path, "NIfTI file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope/scl_inter
    except (ImageFileError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise CorruptFileError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise SliceGeometryError(path, f"expected a 2D or 3D image, got shape {data.shape} "
                                       "(split 4D series into one file per volume)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SliceGeometryError(path, "affine is singular or not finite")
    # nibabel arrays are indexed (i, j, k); ours are (k, j, i).
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return Volume(array, RAS_TO_LPS @ affine, modality=modality, metadata={"source": "nifti"})


def write_nifti(volume: Volume, path: str | Path, dtype=np.int16) -> None:
    """Write a Volume as NIfTI (inverse of read_nifti); used by the synthetic cohort."""
    data = np.transpose(volume.array, (2, 1, 0)).astype(dtype)
    img = nib.Nifti1Image(data, volume.to_nifti_affine())
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
