"""Volume -> NIfTI file (the inverse of data.nifti_reader.read_nifti): the synthetic
cohort's studies and masks and the forecasts' images are written here."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from cohortcast.io.volume import Volume


def write_nifti(volume: Volume, path: str | Path, dtype=np.int16) -> None:
    """Write a Volume as NIfTI (inverse of read_nifti)."""
    data = np.transpose(volume.array, (2, 1, 0)).astype(dtype)
    img = nib.Nifti1Image(data, volume.to_nifti_affine())
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
