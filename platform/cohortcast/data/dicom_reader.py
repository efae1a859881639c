"""DICOM -> Volume in Hounsfield units, geometry kept.

A CT/MR series is a folder of single-frame files: slices are ordered by their position
along the slice normal (never by file name or InstanceNumber, which scanners get
wrong), and the series is rejected, with the reason, when it mixes series, lacks or
duplicates slices, is unevenly spaced, or has no pixel data. A single file is a 2D
image (CR/DX radiograph, or one CT slice): a volume with one slice.

Only geometry and modality leave this module: patient identifiers in the headers are
never copied into the Volume's metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from cohortcast.data.errors import (
    CorruptFileError,
    MissingPathError,
    MissingPixelDataError,
    MixedSeriesError,
    SliceGeometryError,
)
from cohortcast.data.volume import Volume, affine_from_dicom

# Relative tolerances for slice geometry checks.
_DUPLICATE_TOL = 1e-3  # slices closer than this fraction of the median step are duplicates
_UNIFORM_TOL = 0.1  # steps may deviate this much from the median step
_ORIENTATION_TOL = 1e-4


def _read(path: Path, headers_only: bool = False) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise CorruptFileError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _pixels_hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MissingPixelDataError(path, "has no pixel data element (7FE0,0010)")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # truncated or undecodable pixel data: pydicom raises many kinds
        raise CorruptFileError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    # Modality LUT: RescaleSlope/Intercept (or a LUT sequence) -> HU for CT.
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def _spacing(ds: pydicom.Dataset, path: Path) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise SliceGeometryError(path, "no PixelSpacing or ImagerPixelSpacing")
    row, col = float(spacing[0]), float(spacing[1])
    if row <= 0 or col <= 0:
        raise SliceGeometryError(path, f"non-positive pixel spacing {[row, col]}")
    return row, col


def read_dicom_file(path: str | Path) -> Volume:
    """One single-frame DICOM image (a radiograph or one slice) as a 1-slice volume."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(path, "DICOM file does not exist")
    ds = _read(path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SliceGeometryError(path, f"multi-frame images ({ds.NumberOfFrames} frames) are not supported; "
                                       "export the series as single-frame files")
    pixels = _pixels_hu(ds, path)
    if pixels.ndim != 2:
        raise SliceGeometryError(path, f"expected a 2D monochrome image, got pixel array shape {pixels.shape}")
    row_sp, col_sp = _spacing(ds, path)
    thickness = float(ds.get("SliceThickness", 1.0) or 1.0)
    orientation = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    position = np.asarray(ds.get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    affine = affine_from_dicom(position, orientation, row_sp, col_sp, normal * thickness)
    return Volume(pixels[None], affine, modality=str(ds.get("Modality", "OT")),
                  metadata={"source": "dicom", "slices": 1})


def _series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.upper() != "DICOMDIR")
    if not files:
        raise MissingPathError(folder, "DICOM series folder is empty")
    return files


def read_dicom_series(folder: str | Path) -> Volume:
    """A folder holding one single-frame DICOM series -> (Z, Y, X) volume in HU."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingPathError(folder, "DICOM series folder does not exist")
    files = _series_files(folder)
    datasets = [_read(f) for f in files]
    if len(datasets) == 1:
        return read_dicom_file(files[0])

    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) > 1:
        raise MixedSeriesError(folder, f"{len(series_uids)} different SeriesInstanceUIDs in one folder; "
                                       "put each series in its own folder")
    first = datasets[0]
    if "ImageOrientationPatient" not in first or "ImagePositionPatient" not in first:
        raise SliceGeometryError(files[0], "no ImagePositionPatient/ImageOrientationPatient: cannot order slices")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_sp, col_sp = _spacing(first, files[0])
    shape = (int(first.Rows), int(first.Columns))
    for f, ds in zip(files, datasets):
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise SliceGeometryError(f, f"slice size {(ds.Rows, ds.Columns)} differs from {shape}")
        if not np.allclose(np.asarray(ds.get("ImageOrientationPatient", orientation), dtype=np.float64),
                           orientation, atol=_ORIENTATION_TOL):
            raise SliceGeometryError(f, "slice orientation differs from the rest of the series")
        if not np.allclose(_spacing(ds, f), (row_sp, col_sp), rtol=1e-4):
            raise SliceGeometryError(f, "pixel spacing differs from the rest of the series")

    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= 0 or np.any(steps < _DUPLICATE_TOL * max(median, 1e-6)):
        dup = int(np.argmin(steps))
        raise SliceGeometryError(folder, f"duplicated slice position {along[dup]:.3f} mm "
                                         f"({files[order[dup]].name} and {files[order[dup + 1]].name})")
    if np.any(np.abs(steps - median) > _UNIFORM_TOL * median):
        worst = int(np.argmax(np.abs(steps - median)))
        ratio = steps[worst] / median
        if abs(ratio - round(ratio)) < _UNIFORM_TOL and round(ratio) >= 2:
            raise SliceGeometryError(folder, f"{int(round(ratio)) - 1} missing slice(s) after position "
                                             f"{along[worst]:.3f} mm (gap {steps[worst]:.3f} mm, step {median:.3f} mm)")
        raise SliceGeometryError(folder, f"non-uniform slice spacing: {steps[worst]:.3f} mm after "
                                         f"{along[worst]:.3f} mm vs median {median:.3f} mm")

    pixels = np.stack([_pixels_hu(datasets[i], files[i]) for i in order])  # (Z, Y, X)
    # Slice step as a vector: handles gantry tilt (positions not along the normal).
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine = affine_from_dicom(positions[0], orientation, row_sp, col_sp, step)
    return Volume(pixels, affine, modality=str(first.get("Modality", "OT")),
                  metadata={"source": "dicom", "slices": len(files)})
