"""One entry point for any study path: DICOM series folder, DICOM file or NIfTI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cohortcast.data.dicom_reader import read_dicom_file, read_dicom_series
from cohortcast.data.errors import MissingPathError
from cohortcast.data.nifti_reader import is_nifti, read_nifti
from cohortcast.data.volume import Volume


@dataclass(frozen=True)
class ReadLimits:
    """Bounds checked from headers before any voxel is allocated or decompressed:
    ingestion (`ingest.max_voxels`, `ingest.max_uncompressed_mb`) and the service
    (`serve.max_voxels`, `serve.max_uncompressed_mb`) pass their own. Breaking one
    raises errors.TooLargeError."""

    max_voxels: int = 512 * 512 * 2048
    max_uncompressed_bytes: int = 4 * 2**30


def read_study(path: str | Path, modality: str = "CT", limits: ReadLimits | None = None) -> Volume:
    path = Path(path)
    limits = limits or ReadLimits()
    if not path.exists():
        raise MissingPathError(path, "study path does not exist")
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti(path):
        return read_nifti(path, modality=modality)
    return read_dicom_file(path)
