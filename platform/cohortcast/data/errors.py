"""Errors a study can fail with; each names the file and what is wrong with it.
Ingestion turns any of them into a quarantine row and carries on."""


class StudyError(Exception):
    """A study cannot be used. `reason` is a short machine-friendly code."""

    reason = "unreadable"

    def __init__(self, where: str, message: str):
        self.where = str(where)
        super().__init__(f"{where}: {message}")


class MissingPathError(StudyError):
    reason = "missing_path"


class CorruptFileError(StudyError):
    reason = "corrupt_file"


class MixedSeriesError(StudyError):
    reason = "mixed_series"


class SliceGeometryError(StudyError):
    """Missing, duplicated or unevenly spaced slices, inconsistent orientation/shape."""

    reason = "bad_geometry"


class MissingPixelDataError(StudyError):
    reason = "missing_pixel_data"


class FindingOutsideImageError(StudyError):
    reason = "finding_outside_image"


class TooLargeError(StudyError):
    """More voxels or uncompressed bytes than the configured ReadLimits allow, found
    from headers before the data is allocated (decompression bombs included)."""

    reason = "too_large"
