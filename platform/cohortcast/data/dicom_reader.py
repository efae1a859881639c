"""DICOM -> Volume in Hounsfield units, geometry kept.

A CT/MR series is a folder of single-frame files: slices are ordered by their position
along the slice normal (never by file name or InstanceNumber, which scanners get
wrong), and the series is rejected, with the reason, when it mixes series, lacks or
duplicates slices, is unevenly spaced, or has no pixel data. A single file is a 2D
image (CR/DX radiograph, or one CT slice): a volume with one slice. Its orientation is
ImageOrientationPatient when present, else derived from PatientOrientation's letters
(what DX/CR objects carry; origin at 0 since they have no ImagePositionPatient), else
axial.

Every file is parsed once, its large values (pixel data included) deferred: nothing
big is loaded until the series has been checked from headers alone: file by file (empty, not DICOM, truncated header),
modality against the manifest, size against the ReadLimits, then series identity and
geometry. Only then are pixels read, one file at a time, into one preallocated array.

Only geometry and modality leave this module: patient identifiers in the headers are
never copied into the Volume's metadata.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from cohortcast.data.errors import (
    CorruptFileError,
    DuplicateInstanceError,
    EmptyFileError,
    EmptySeriesError,
    MissingPathError,
    MissingPixelDataError,
    MixedSeriesError,
    ModalityMismatchError,
    NotDicomError,
    SliceGeometryError,
    StudyError,
    from_os_error,
)
from cohortcast.data.limits import ReadLimits
from cohortcast.io.volume import Volume, affine_from_dicom

# Relative tolerances for slice geometry checks.
_DUPLICATE_TOL = 1e-3  # slices closer than this fraction of the median step are duplicates
_UNIFORM_TOL = 0.1  # steps may deviate this much from the median step
_ORIENTATION_TOL = 1e-4
# Values above this size (pixel data, private blobs) stay on disk until accessed: the
# checks run on headers, and the pixels are read one file at a time afterwards (one
# parse per file: a separate header pass measured +45% read time per file).
_DEFER_BYTES = 16 * 1024
# Radiographs are labelled CR or DX interchangeably by sites and vendors; masks
# (SEG) may be stored under any modality: neither is a contradiction worth refusing.
_MODALITY_GROUPS = {"CR": "radiograph", "DX": "radiograph"}
_UNCHECKED_MODALITIES = {"SEG", "OT"}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class _Header:
    """What the checks need from one file's header, parsed once into plain values."""

    path: Path
    ds: pydicom.Dataset | None  # pixel data deferred; dropped once decoded
    series_uid: str
    sop_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    samples: int
    bits: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    patient_orientation: tuple[str, ...] | None  # (0020,0020) letters, read when there is no orientation
    spacing: tuple[float, ...] | None  # (row, column) mm, PixelSpacing or ImagerPixelSpacing
    thickness: float
    photometric: str = "MONOCHROME2"

    @property
    def voxels(self) -> int:
        return self.rows * self.columns * self.frames

    @property
    def nbytes(self) -> int:
        return (self.voxels * self.samples * self.bits + 7) // 8


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise from_os_error(path, exc) from None


def _floats(value, n: int) -> np.ndarray | None:
    if value is None:
        return None
    out = np.asarray([float(v) for v in value], dtype=np.float64)
    return out if out.shape == (n,) else None


def _strings(value) -> tuple[str, ...] | None:
    """A multi-valued string element; an empty one (allowed for type 2 elements) is absent."""
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    values = tuple(str(v).strip().upper() for v in values)
    return values if any(values) else None


# PatientOrientation letters as LPS unit vectors (DICOM PS3.3 C.7.6.1.1.1).
_PATIENT_AXES = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def _patient_direction(letters: str, path: Path) -> np.ndarray:
    """One PatientOrientation value (e.g. "L", or "LF" for an oblique axis, the most
    significant letter first) as a unit LPS vector. DICOM gives no angle for an
    oblique value: its letters are weighted equally (45 degrees for two)."""
    if not letters or any(c not in _PATIENT_AXES for c in letters) or len(set(letters)) != len(letters):
        raise SliceGeometryError(
            path, f"PatientOrientation value {letters!r} is not made of distinct letters from L, R, A, P, H, F"
        )
    vector = np.sum([_PATIENT_AXES[c] for c in letters], axis=0)
    norm = np.linalg.norm(vector)
    if norm < 1e-6:  # opposite letters ("LR") cancel out
        raise SliceGeometryError(path, f"PatientOrientation value {letters!r} names opposite directions")
    return vector / norm


def orientation_from_patient_orientation(values: tuple[str, ...], path: Path) -> np.ndarray:
    """PatientOrientation (direction of the rows, then of the columns: e.g. ["L", "F"]
    for a PA chest film as displayed) -> the six ImageOrientationPatient cosines.
    Projection radiographs (DX/CR) carry this instead of ImageOrientationPatient. The
    column direction is made orthogonal to the row direction (oblique values are
    approximate); parallel directions are refused."""
    if len(values) != 2:
        raise SliceGeometryError(path, f"PatientOrientation has {len(values)} value(s) {list(values)}, expected 2")
    rows, columns = (_patient_direction(v, path) for v in values)
    columns = columns - (columns @ rows) * rows
    norm = np.linalg.norm(columns)
    if norm < 1e-3:
        raise SliceGeometryError(path, f"PatientOrientation {list(values)}: rows and columns run along the same axis")
    return np.concatenate([rows, columns / norm])


def _parse_header(ds: pydicom.Dataset, path: Path, in_series: bool) -> _Header:
    """pydicom converts values lazily, so a damaged value raises here, not at read."""
    required = ["Rows", "Columns"] + (["SeriesInstanceUID", "SOPInstanceUID"] if in_series else [])
    missing = [tag for tag in required if tag not in ds]
    if missing:
        raise CorruptFileError(path, f"header lacks {', '.join(missing)}: the file is truncated or not an image")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return _Header(
        path=path,
        ds=ds,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "") or "").strip().upper(),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        bits=int(ds.get("BitsAllocated", 16) or 16),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        patient_orientation=_strings(ds.get("PatientOrientation")),
        spacing=tuple(float(v) for v in spacing) if spacing is not None else None,
        thickness=float(ds.get("SliceThickness", 1.0) or 1.0),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper(),
    )


def _read_header(path: Path, limits: ReadLimits, in_series: bool) -> _Header:
    size = _file_size(path)
    if size == 0:
        raise EmptyFileError(path, "is empty (0 bytes)")
    # The parse reads through the whole file (large values deferred, small ones kept):
    # bound its size before anything is parsed.
    limits.check(path, 0, size, "the file is")
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except InvalidDicomError:
        raise NotDicomError(
            path, f"is not a DICOM file ({size} bytes, no 'DICM' marker after the 128-byte preamble)"
        ) from None
    except OSError as exc:
        raise from_os_error(path, exc) from None
    except Exception as exc:  # damaged headers make pydicom raise many types
        raise CorruptFileError(path, f"DICOM header cannot be parsed ({type(exc).__name__})") from None
    try:
        return _parse_header(ds, path, in_series)
    except StudyError:
        raise
    except Exception as exc:
        raise CorruptFileError(path, f"DICOM header value cannot be parsed ({type(exc).__name__}: {exc})") from None


def _check_modality(header: _Header, expected: str | None) -> None:
    if not expected or not header.modality:
        return
    expected = expected.strip().upper()
    if expected in _UNCHECKED_MODALITIES:
        return
    if _MODALITY_GROUPS.get(header.modality, header.modality) != _MODALITY_GROUPS.get(expected, expected):
        raise ModalityMismatchError(
            header.path, f"DICOM Modality is {header.modality} but the study is listed as {expected}"
        )


def _check_pixel_length(ds: pydicom.Dataset, header: _Header) -> None:
    """Native (uncompressed) pixel data must hold what Rows x Columns x BitsAllocated
    declare: shorter is a truncated file, longer a header that describes other pixels
    (pydicom would silently drop the excess)."""
    try:
        if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
            return
    except Exception:  # no or unknown transfer syntax: the decoder reports it
        return
    have, want = len(ds.PixelData), header.nbytes
    if have < want:
        raise CorruptFileError(
            header.path,
            f"pixel data is truncated: {have} of the {want} bytes that "
            f"{header.rows} x {header.columns} x {header.bits} bits declare",
        )
    if have > want + 1:  # + 1: odd lengths are padded to even
        raise CorruptFileError(
            header.path,
            f"header/pixel size mismatch: pixel data holds {have} bytes, "
            f"{header.rows} x {header.columns} x {header.bits} bits declare {want}",
        )


def _pixels_hu(header: _Header) -> np.ndarray:
    """One file's pixels through the modality LUT (RescaleSlope/Intercept -> HU)."""
    path, ds = header.path, header.ds
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise MissingPixelDataError(path, "has no pixel data element (7FE0,0010)")
    try:
        _check_pixel_length(ds, header)
        raw = ds.pixel_array  # reads the deferred value now
        # An overflowing rescale gives Inf: require_finite reports it, not a warning.
        with np.errstate(over="ignore", invalid="ignore"):
            pixels = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    except StudyError:
        raise
    except OSError as exc:
        raise from_os_error(path, exc) from None
    except Exception as exc:  # truncated or undecodable pixel data: pydicom raises many kinds
        raise CorruptFileError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    finally:
        header.ds = None  # drop the pixel data with the dataset once decoded
    if pixels.shape != (header.rows, header.columns):
        raise SliceGeometryError(
            path,
            f"expected a 2D monochrome {header.rows} x {header.columns} image, got pixel array shape {pixels.shape}",
        )
    return pixels


def _spacing(header: _Header) -> tuple[float, float]:
    if header.spacing is None or len(header.spacing) != 2:
        raise SliceGeometryError(header.path, "no PixelSpacing or ImagerPixelSpacing")
    row, col = header.spacing
    if not (row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col)):
        raise SliceGeometryError(header.path, f"pixel spacing {[row, col]} is not positive and finite")
    return row, col


def _check_single_frame(header: _Header) -> None:
    if header.frames > 1:
        raise SliceGeometryError(
            header.path,
            f"multi-frame images ({header.frames} frames) are not supported; export the series as single-frame files",
        )
    if header.rows < 1 or header.columns < 1:
        raise SliceGeometryError(header.path, f"empty image ({header.rows} x {header.columns})")


def _single_orientation(header: _Header) -> np.ndarray:
    """ImageOrientationPatient if present; else the PatientOrientation letters (DX/CR
    objects have only those, and no ImagePositionPatient: the origin stays at 0); else
    axial, the only guess left."""
    if header.orientation is not None:
        return header.orientation
    if header.patient_orientation is not None:
        return orientation_from_patient_orientation(header.patient_orientation, header.path)
    return np.array([1.0, 0, 0, 0, 1, 0])


def _read_single(header: _Header, limits: ReadLimits) -> Volume:
    _check_single_frame(header)
    limits.check(header.path, header.voxels, header.nbytes, "header declares")
    row_sp, col_sp = _spacing(header)
    orientation = _single_orientation(header)  # from the header: refused before any pixel is read
    pixels = _pixels_hu(header)
    position = header.position if header.position is not None else np.zeros(3)
    normal = np.cross(orientation[:3], orientation[3:])
    affine = affine_from_dicom(position, orientation, row_sp, col_sp, normal * header.thickness)
    metadata = {"source": "dicom", "slices": 1}
    if header.photometric == "MONOCHROME1":  # low values display white (many CR/DX): whoever displays must invert
        metadata["photometric"] = header.photometric
    return Volume(pixels[None], affine, modality=header.modality or "OT", metadata=metadata)


def read_dicom_file(path: str | Path, modality: str | None = None, limits: ReadLimits | None = None) -> Volume:
    """One single-frame DICOM image (a radiograph or one slice) as a 1-slice volume.
    `modality`, when given, must agree with the file's Modality tag."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(path, "DICOM file does not exist")
    header = _read_header(path, limits or ReadLimits(), in_series=False)
    _check_modality(header, modality)
    return _read_single(header, limits or ReadLimits())


def _series_files(folder: Path) -> list[Path]:
    """Every non-hidden entry that is not a folder: a dangling link or a link loop is a
    member that cannot be read (and says so), not something to skip silently."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise from_os_error(folder, exc, "series folder") from None
    files = [p for p in entries if not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and not p.is_dir()]
    if not files:
        raise EmptySeriesError(folder, "DICOM series folder holds no files")
    return files


def _check_series_identity(folder: Path, headers: list[_Header]) -> None:
    series_uids = Counter(h.series_uid for h in headers)
    if len(series_uids) > 1:
        majority = series_uids.most_common(1)[0][0]
        odd = next(h.path.name for h in headers if h.series_uid != majority)
        raise MixedSeriesError(
            folder,
            f"{len(series_uids)} different SeriesInstanceUIDs in one folder "
            f"(e.g. {odd}); put each series in its own folder",
        )
    seen: dict[str, Path] = {}
    for h in headers:
        if h.sop_uid in seen:
            raise DuplicateInstanceError(
                folder,
                f"{seen[h.sop_uid].name} and {h.path.name} have the same SOPInstanceUID: one image is there twice",
            )
        seen[h.sop_uid] = h.path


def _check_slices_agree(headers: list[_Header]) -> tuple[np.ndarray, tuple[float, float]]:
    first = headers[0]
    if first.orientation is None or first.position is None:
        raise SliceGeometryError(first.path, "no ImagePositionPatient/ImageOrientationPatient: cannot order slices")
    if not np.all(np.isfinite(first.orientation)):
        raise SliceGeometryError(first.path, "ImageOrientationPatient is not finite")
    spacing = _spacing(first)
    for h in headers:
        _check_single_frame(h)
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise SliceGeometryError(
                h.path, f"slice size {(h.rows, h.columns)} differs from {(first.rows, first.columns)}"
            )
        if h.position is None:
            raise SliceGeometryError(h.path, "no ImagePositionPatient: cannot order slices")
        orientation = h.orientation if h.orientation is not None else first.orientation
        if not np.allclose(orientation, first.orientation, atol=_ORIENTATION_TOL):
            raise SliceGeometryError(h.path, "slice orientation differs from the rest of the series")
        if not np.allclose(_spacing(h), spacing, rtol=1e-4):
            raise SliceGeometryError(h.path, "pixel spacing differs from the rest of the series")
    return first.orientation, spacing


def _slice_order(folder: Path, headers: list[_Header], normal: np.ndarray) -> np.ndarray:
    """Indices of `headers` sorted along the normal; refuses duplicated, missing or
    unevenly spaced slices."""
    along = np.array([h.position @ normal for h in headers])
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    median = float(np.median(steps))
    if not np.isfinite(median):
        raise SliceGeometryError(folder, "slice positions are not finite")
    if median <= 0 or np.any(steps < _DUPLICATE_TOL * max(median, 1e-6)):
        dup = int(np.argmin(steps))
        raise SliceGeometryError(
            folder,
            f"duplicated slice position {along[dup]:.3f} mm "
            f"({headers[order[dup]].path.name} and {headers[order[dup + 1]].path.name})",
        )
    if np.any(np.abs(steps - median) > _UNIFORM_TOL * median):
        worst = int(np.argmax(np.abs(steps - median)))
        ratio = steps[worst] / median
        if abs(ratio - round(ratio)) < _UNIFORM_TOL and round(ratio) >= 2:
            raise SliceGeometryError(
                folder,
                f"{int(round(ratio)) - 1} missing slice(s) after position "
                f"{along[worst]:.3f} mm (gap {steps[worst]:.3f} mm, step {median:.3f} mm)",
            )
        raise SliceGeometryError(
            folder,
            f"non-uniform slice spacing: {steps[worst]:.3f} mm after {along[worst]:.3f} mm vs median {median:.3f} mm",
        )
    return order


def read_dicom_series(folder: str | Path, modality: str | None = None, limits: ReadLimits | None = None) -> Volume:
    """A folder holding one single-frame DICOM series -> (Z, Y, X) volume in HU.
    `modality`, when given, must agree with every file's Modality tag."""
    folder = Path(folder)
    limits = limits or ReadLimits()
    if not folder.is_dir():
        raise MissingPathError(folder, "DICOM series folder does not exist")
    files = _series_files(folder)
    headers = [_read_header(f, limits, in_series=len(files) > 1) for f in files]
    for h in headers:
        _check_modality(h, modality)
    if len(headers) == 1:
        return _read_single(headers[0], limits)
    limits.check(
        folder, sum(h.voxels for h in headers), sum(h.nbytes for h in headers), f"{len(headers)} slice headers declare"
    )
    _check_series_identity(folder, headers)
    orientation, (row_sp, col_sp) = _check_slices_agree(headers)
    normal = np.cross(orientation[:3], orientation[3:])
    order = _slice_order(folder, headers, normal)

    pixels = np.empty((len(headers), headers[0].rows, headers[0].columns), np.float32)  # (Z, Y, X)
    for z, i in enumerate(order):
        pixels[z] = _pixels_hu(headers[i])
    positions = np.array([headers[i].position for i in order])
    # Slice step as a vector: handles gantry tilt (positions not along the normal).
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine = affine_from_dicom(positions[0], orientation, row_sp, col_sp, step)
    return Volume(
        pixels, affine, modality=headers[0].modality or "OT", metadata={"source": "dicom", "slices": len(files)}
    )
