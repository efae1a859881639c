"""Forecasts from a whole baseline study: an uploaded NIfTI file, one DICOM file, several
DICOM files of one series, or a .zip of them, plus where the nodule is. The crop is cut
exactly as ingestion cuts it (`data.transforms.nodule_crop` + `window`, the serving
config's ingest settings), so the model sees what training saw.

Privacy: uploads are written under generated names in a private temporary folder and
removed afterwards; no DICOM header value reaches the answer, the logs or an error
message (errors name the upload by its position, never by its file name).

Decompression bombs: a small upload can unpack to terabytes (a zip member's header
may claim any size, a .nii.gz any length). What an upload may unpack to is bounded by
`StudyLimits`: the zip headers' sizes are summed before anything is extracted, each
member is then streamed to disk against a running total (headers can lie), and the
readers check voxel counts and the gzip stream against `ReadLimits`. Breaking a limit
is a 413 naming it."""

from __future__ import annotations

import io
import lzma
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, FiniteFloat, model_validator

from cohortcast.io.volume import Volume
from cohortcast.serving.requests import ForecastSettings, RequestError


class StudyForecastRequest(ForecastSettings):
    """The `request` form field (JSON) next to the uploaded study files."""

    center_lps_mm: list[FiniteFloat] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description=("nodule centre in patient coordinates (DICOM LPS, mm): the manifest's center_x/y/z_mm"),
    )
    center_voxel: list[FiniteFloat] | None = Field(
        default=None,
        min_length=3,
        max_length=3,
        description=(
            "nodule centre as voxel indices (i, j, k) of the uploaded image: NIfTI array order, or (column, row, "
            "slice) of the DICOM series sorted along its normal"
        ),
    )

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
    affine: np.ndarray  # (4, 4): the crop's grid, (column, row, 0, 1) -> LPS mm (io.crop.Crop)


@dataclass(frozen=True)
class StudyLimits:
    """What one upload may unpack to (ServeConfig's max_uncompressed_mb, max_voxels,
    max_study_files; errors cite those keys)."""

    max_uncompressed_bytes: int = 2048 * 2**20
    max_voxels: int = 512 * 512 * 1024
    max_files: int = 4096

    @classmethod
    def from_config(cls, cfg) -> StudyLimits:
        return cls(int(cfg.max_uncompressed_mb * 2**20), int(cfg.max_voxels), int(cfg.max_study_files))

    def read_limits(self):
        from cohortcast.data.readers import ReadLimits

        return ReadLimits(max_voxels=self.max_voxels, max_uncompressed_bytes=self.max_uncompressed_bytes)

    def too_large(self) -> RequestError:
        return RequestError(
            "study",
            f"the upload unpacks to more than serve.max_uncompressed_mb "
            f"({self.max_uncompressed_bytes / 2**20:.0f} MiB)",
            status=413,
        )


class _Budget:
    """Bytes still allowed on disk for this upload (every written byte counts)."""

    def __init__(self, limits: StudyLimits):
        self.limits, self.left, self.files = limits, limits.max_uncompressed_bytes, 0

    def take(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise self.limits.too_large()

    def add_files(self, count: int) -> None:
        self.files += count
        if self.files > self.limits.max_files:
            raise RequestError("study", f"more than serve.max_study_files ({self.limits.max_files}) files", status=413)


def _kind(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".nii") or lower.endswith(".nii.gz"):
        return "nifti"
    return "zip" if lower.endswith(".zip") else "dicom"


def _copy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: _Budget) -> None:
    """Stream one member to `target` in 1 MiB chunks, charging the budget as it goes:
    the member's header size was checked already, but only the bytes themselves count."""
    with archive.open(member) as source, open(target, "wb") as sink:
        while chunk := source.read(1 << 20):
            budget.take(len(chunk))
            sink.write(chunk)


def _unzip(data: bytes, folder: Path, index: int, budget: _Budget) -> int:
    """Members go to generated names (never the archive's paths: no zip-slip)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
            budget.add_files(len(members))
            # The headers' own claim first: an honest bomb is refused before any work.
            if sum(m.file_size for m in members) > budget.left:
                raise budget.limits.too_large()
            for n, member in enumerate(members):
                _copy_member(archive, member, folder / f"z{index:03d}_{n:05d}.dcm", budget)
    except RequestError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zlib.error,
        lzma.LZMAError,
    ) as exc:
        # Corrupt, encrypted (RuntimeError) or exotic (NotImplementedError) archives.
        raise RequestError(
            "study", f"upload {index + 1} is not a readable .zip archive ({type(exc).__name__})"
        ) from None
    return len(members)


def _write_series(uploads: list[Upload], folder: Path, budget: _Budget) -> Path:
    """DICOM files and .zip archives -> one folder of files (or the one file)."""
    folder.mkdir()
    files = 0
    for index, upload in enumerate(uploads):
        if _kind(upload.name) == "zip":
            files += _unzip(upload.data, folder, index, budget)
        else:
            budget.add_files(1)
            budget.take(len(upload.data))
            (folder / f"u{index:05d}.dcm").write_bytes(upload.data)
            files += 1
    if files == 0:
        raise RequestError("study", "the archive holds no files")
    return next(folder.iterdir()) if files == 1 else folder


def _read(path: Path, workdir: Path, limits: StudyLimits) -> Volume:
    """read_study with the service's limits; its errors as RequestErrors without our paths."""
    from cohortcast.data.errors import StudyError, TooLargeError
    from cohortcast.data.readers import read_study

    try:
        return read_study(path, limits=limits.read_limits())
    except TooLargeError as exc:
        raise RequestError(
            "study",
            f"too large: {_hide(exc, workdir)} (limits: serve.max_voxels "
            f"{limits.max_voxels}, serve.max_uncompressed_mb "
            f"{limits.max_uncompressed_bytes / 2**20:.0f})",
            status=413,
        ) from None
    except StudyError as exc:
        raise RequestError("study", f"{exc.reason}: {_hide(exc, workdir)}") from None
    except MemoryError:
        raise RequestError("study", "too large to read on this service", status=413) from None
    except Exception as exc:  # an exotic file must be a 400, not a 500
        raise RequestError("study", f"unreadable study ({type(exc).__name__})") from None


def _hide(exc: Exception, workdir: Path) -> str:
    # The message names our generated path; say what is wrong, not where we put it.
    return str(exc).replace(str(workdir), "<upload>")


def read_uploaded_study(
    uploads: list[Upload], workdir: Path, max_bytes: int, limits: StudyLimits | None = None
) -> Volume:
    """Uploads -> one Volume; RequestError("study", ...) for anything unreadable, 413
    past `max_bytes` sent or a `limits` bound unpacked."""
    limits = limits or StudyLimits()
    if not uploads:
        raise RequestError("study", "no file uploaded")
    if sum(len(u.data) for u in uploads) > max_bytes:
        raise RequestError(
            "study", f"uploads exceed the limit of serve.max_upload_mb ({max_bytes / 2**20:.0f} MiB)", status=413
        )
    kinds = [_kind(u.name) for u in uploads]
    if "nifti" in kinds:
        if len(uploads) != 1:
            raise RequestError("study", "send one NIfTI file, or the DICOM files of one series")
        suffix = ".nii.gz" if uploads[0].name.lower().endswith(".gz") else ".nii"
        path = workdir / f"study{suffix}"
        path.write_bytes(uploads[0].data)  # the reader bounds its gzip stream and voxels
    else:
        path = _write_series(uploads, workdir / "series", _Budget(limits))
    return _read(path, workdir, limits)


def crop_study(volume: Volume, request: StudyForecastRequest, ingest) -> StudyCrop:
    """The nodule crop as ingestion cuts it; RequestError when the centre is outside."""
    from cohortcast.data.errors import StudyError
    from cohortcast.data.transforms import check_inside, nodule_crop, window

    field = "center_lps_mm" if request.center_lps_mm is not None else "center_voxel"
    try:
        if request.center_lps_mm is not None:
            centre = np.asarray(request.center_lps_mm, np.float64)
        else:
            centre = volume.voxel_to_world(np.asarray(request.center_voxel, np.float64)[None])[0]
        check_inside(volume, centre, "the nodule centre")
        crop = nodule_crop(volume, centre, ingest.crop_size, ingest.crop_spacing_mm)
    except StudyError as exc:
        raise RequestError(field, str(exc)) from None
    except Exception as exc:  # a readable but degenerate image (odd geometry): the client's study, not a 500
        raise RequestError("study", f"cannot cut a crop from this study ({type(exc).__name__})") from None
    return StudyCrop(window(crop.array, *ingest.hu_window, ingest.normalise), centre, crop.affine)


def study_crop(
    uploads: list[Upload], request: StudyForecastRequest, ingest, max_bytes: int, limits: StudyLimits | None = None
) -> StudyCrop:
    """Blocking (file IO, resampling): the ingress runs it in a worker thread."""
    with tempfile.TemporaryDirectory(prefix="cohortcast-upload-") as tmp:
        return crop_study(read_uploaded_study(uploads, Path(tmp), max_bytes, limits), request, ingest)


def nifti_zip(mean: np.ndarray, variance: np.ndarray, samples: np.ndarray, affine: np.ndarray, ingest) -> bytes:
    """mean.nii.gz and samples.nii.gz in HU, variance.nii.gz, on the crop's patient-space
    grid `affine` (StudyCrop.affine: they overlay the uploaded study in a viewer), zipped."""
    from cohortcast.inference.forecast_outputs import to_hu, write_case_images

    with tempfile.TemporaryDirectory(prefix="cohortcast-nifti-") as tmp:
        folder = Path(tmp)
        write_case_images(
            folder,
            to_hu(mean, ingest.hu_window, ingest.normalise),
            variance,
            to_hu(samples, ingest.hu_window, ingest.normalise),
            affine,
            subject="",
            case_key="",
            target_date=None,
            dicom=False,
        )
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # .nii.gz: already compressed
            for name in ("mean.nii.gz", "variance.nii.gz", "samples.nii.gz"):
                archive.write(folder / name, name)
    return buffer.getvalue()
