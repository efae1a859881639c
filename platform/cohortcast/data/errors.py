"""Errors a study can fail with; each names the file and what is wrong with it.
Ingestion turns any of them into a quarantine row and carries on.

`where` is the path as the reader saw it; ingestion rewrites it to the manifest's
relative path before anything is written (folder names may hold identifiers)."""

from __future__ import annotations

import errno

from cohortcast.errors import CohortcastError


def printable(text: str) -> str:
    """File names that are not valid UTF-8 reach Python as lone surrogates, which
    Arrow (and JSON) refuse to encode: show their bytes as \\xNN escapes instead."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class StudyError(CohortcastError):
    """A study cannot be used. `reason` is a short machine-friendly code."""

    reason = "unreadable"

    def __init__(self, where: str, message: str):
        self.where = printable(str(where))
        super().__init__(printable(f"{self.where}: {message}"))


class MissingPathError(StudyError):
    reason = "missing_path"


class EmptySeriesError(StudyError):
    """A series folder that holds no files (hidden files and DICOMDIR ignored)."""

    reason = "empty_series"


class EmptyFileError(StudyError):
    """A 0-byte file: an interrupted copy, never a DICOM or NIfTI image."""

    reason = "empty_file"


class NotDicomError(StudyError):
    """A file in a DICOM series (or given as one) without the DICOM file marker."""

    reason = "not_dicom"


class CorruptFileError(StudyError):
    reason = "corrupt_file"


class PermissionDeniedError(StudyError):
    reason = "permission_denied"


class SymlinkLoopError(StudyError):
    reason = "symlink_loop"


class MixedSeriesError(StudyError):
    reason = "mixed_series"


class DuplicateInstanceError(StudyError):
    """Two files with the same SOPInstanceUID: one image copied twice."""

    reason = "duplicate_instance"


class ModalityMismatchError(StudyError):
    """The DICOM Modality tag contradicts the modality the manifest lists."""

    reason = "modality_mismatch"


class SliceGeometryError(StudyError):
    """Missing, duplicated or unevenly spaced slices, inconsistent orientation/shape."""

    reason = "bad_geometry"


class MissingPixelDataError(StudyError):
    reason = "missing_pixel_data"


class NonFiniteVoxelsError(StudyError):
    """NaN or infinite voxel values (float NIfTI, or a DICOM rescale that overflows):
    they would poison every crop, patch and volume cut from the study."""

    reason = "non_finite_voxels"


class FindingOutsideImageError(StudyError):
    reason = "finding_outside_image"


class TooLargeError(StudyError):
    """More voxels or uncompressed bytes than the configured ReadLimits allow, found
    from headers before the data is allocated (decompression bombs included)."""

    reason = "too_large"
    http_status = 413


def from_os_error(where, exc: OSError, what: str = "file") -> StudyError:
    """An OSError as the StudyError that names it. Only `strerror` is kept: the
    exception's own text repeats the absolute path."""
    if exc.errno == errno.ELOOP:
        return SymlinkLoopError(where, f"{what} is a symbolic link loop")
    if isinstance(exc, PermissionError):
        return PermissionDeniedError(where, f"{what} cannot be read: permission denied")
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return MissingPathError(where, f"{what} does not exist")
    return StudyError(where, f"{what} cannot be read ({exc.strerror or type(exc).__name__})")
