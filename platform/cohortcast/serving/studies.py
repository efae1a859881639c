"""Forecasts from a whole baseline study: an uploaded NIfTI file, one DICOM file, several
DICOM files of one series, or a .zip of them, plus where the nodule is. The crop is cut
exactly as ingestion cuts it (`data.transforms.axial_crop` + `window`, the serving
config's ingest settings), so the model sees what training saw.

Privacy: uploads are written under generated names in a private temporary folder and
removed afterwards; no DICOM header value reaches the answer, the logs or an error
message (errors name the upload by its position, never by its file name)."""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from cohortcast.data.volume import Volume
from cohortcast.serving.requests import ForecastSettings, RequestError


class StudyForecastRequest(ForecastSettings):
    """The `request` form field (JSON) next to the uploaded study files."""

    center_lps_mm: list[float] | None = Field(default=None, min_length=3, max_length=3, description=(
        "nodule centre in patient coordinates (DICOM LPS, mm): the manifest's center_x/y/z_mm"))
    center_voxel: list[float] | None = Field(default=None, min_length=3, max_length=3, description=(
        "nodule centre as voxel indices (i, j, k) of the uploaded image: NIfTI array order, or (column, row, "
        "slice) of the DICOM series sorted along its normal"))

    @model_validator(mode="after")
    def _one_centre(self):
        if (self.center_lps_mm is None) == (self.center_voxel is None):
            raise ValueError("give exactly one of center_lps_mm or center_voxel")
        return self


@dataclass
class Upload:
    name: str  # as the client sent it: used for the file type only, never echoed
    data: bytes


@dataclass
class StudyCrop:
    crop: np.ndarray  # (H, W) in the ingestion scale
    center_lps_mm: np.ndarray  # (3,)


def _kind(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".nii") or lower.endswith(".nii.gz"):
        return "nifti"
    return "zip" if lower.endswith(".zip") else "dicom"


def _unzip(data: bytes, folder: Path, index: int) -> int:
    """Members go to generated names (never the archive's paths: no zip-slip)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
            for n, member in enumerate(members):
                (folder / f"z{index:03d}_{n:05d}.dcm").write_bytes(archive.read(member))
    except zipfile.BadZipFile:
        raise RequestError("study", f"upload {index + 1} is not a readable .zip archive") from None
    return len(members)


def read_uploaded_study(uploads: list[Upload], workdir: Path, max_bytes: int) -> Volume:
    """Uploads -> one Volume; RequestError("study", ...) for anything unreadable."""
    from cohortcast.data.errors import StudyError
    from cohortcast.data.readers import read_study

    if not uploads:
        raise RequestError("study", "no file uploaded")
    if sum(len(u.data) for u in uploads) > max_bytes:
        raise RequestError("study", f"uploads exceed the limit of {max_bytes / 2**20:.0f} MiB", status=413)
    kinds = [_kind(u.name) for u in uploads]
    if "nifti" in kinds:
        if len(uploads) != 1:
            raise RequestError("study", "send one NIfTI file, or the DICOM files of one series")
        suffix = ".nii.gz" if uploads[0].name.lower().endswith(".gz") else ".nii"
        path = workdir / f"study{suffix}"
        path.write_bytes(uploads[0].data)
    else:
        path = workdir / "series"
        path.mkdir()
        files = 0
        for index, upload in enumerate(uploads):
            if _kind(upload.name) == "zip":
                files += _unzip(upload.data, path, index)
            else:
                (path / f"u{index:05d}.dcm").write_bytes(upload.data)
                files += 1
        if files == 0:
            raise RequestError("study", "the archive holds no files")
        if files == 1:
            path = next(path.iterdir())
    try:
        return read_study(path)
    except StudyError as exc:
        # The message names our generated path; say what is wrong, not where we put it.
        raise RequestError("study", f"{exc.reason}: {str(exc).replace(str(workdir), '<upload>')}") from None
    except Exception as exc:  # an exotic file must be a 400, not a 500
        raise RequestError("study", f"unreadable study ({type(exc).__name__})") from None


def crop_study(volume: Volume, request: StudyForecastRequest, ingest) -> StudyCrop:
    """The nodule crop as ingestion cuts it; RequestError when the centre is outside."""
    from cohortcast.data.errors import StudyError
    from cohortcast.data.transforms import axial_crop, check_inside, window

    if request.center_lps_mm is not None:
        centre = np.asarray(request.center_lps_mm, np.float64)
        field = "center_lps_mm"
    else:
        centre = volume.voxel_to_world(np.asarray(request.center_voxel, np.float64)[None])[0]
        field = "center_voxel"
    try:
        check_inside(volume, centre, "the nodule centre")
    except StudyError as exc:
        raise RequestError(field, str(exc)) from None
    crop = axial_crop(volume, centre, ingest.crop_size, ingest.crop_spacing_mm)
    return StudyCrop(window(crop, *ingest.hu_window, ingest.normalise), centre)


def study_crop(uploads: list[Upload], request: StudyForecastRequest, ingest, max_bytes: int) -> StudyCrop:
    """Blocking (file IO, resampling): the ingress runs it in a worker thread."""
    with tempfile.TemporaryDirectory(prefix="cohortcast-upload-") as tmp:
        return crop_study(read_uploaded_study(uploads, Path(tmp), max_bytes), request, ingest)


def nifti_zip(mean: np.ndarray, variance: np.ndarray, samples: np.ndarray, centre_lps_mm: np.ndarray,
              ingest) -> bytes:
    """mean.nii.gz and samples.nii.gz in HU, variance.nii.gz, on the crop's patient-space
    grid (they overlay the uploaded study in a viewer), zipped."""
    from cohortcast.inference.forecast_outputs import to_hu, write_case_images

    with tempfile.TemporaryDirectory(prefix="cohortcast-nifti-") as tmp:
        folder = Path(tmp)
        write_case_images(folder, to_hu(mean, ingest.hu_window, ingest.normalise), variance,
                          to_hu(samples, ingest.hu_window, ingest.normalise), centre_lps_mm, ingest.crop_spacing_mm,
                          subject="", case_key="", target_date=None, dicom=False)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # .nii.gz: already compressed
            for name in ("mean.nii.gz", "variance.nii.gz", "samples.nii.gz"):
                archive.write(folder / name, name)
    return buffer.getvalue()
