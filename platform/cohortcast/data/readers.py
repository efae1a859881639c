"""One entry point for any study path: DICOM series folder, DICOM file or NIfTI."""

from __future__ import annotations

from pathlib import Path

from cohortcast.data.dicom_reader import read_dicom_file, read_dicom_series
from cohortcast.data.errors import MissingPathError
from cohortcast.data.nifti_reader import is_nifti, read_nifti
from cohortcast.data.volume import Volume


def read_study(path: str | Path, modality: str = "CT") -> Volume:
    path = Path(path)
    if not path.exists():
        raise MissingPathError(path, "study path does not exist")
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti(path):
        return read_nifti(path, modality=modality)
    return read_dicom_file(path)
