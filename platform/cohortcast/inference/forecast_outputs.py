"""A forecast as images a radiologist can open next to the real scans.

Ingestion samples each crop on a grid in patient space (LPS mm) around the nodule and
keeps that grid as the crop's affine (`data.transforms.nodule_crop`, the nodules
table's `crop_affine`): axial for CT volumes, the image's own plane for a single 2D
image (a radiograph, an oblique slice). The forecast is an image on the same grid, so
its NIfTI affine and DICOM position/orientation/spacing are that affine, taken as is,
and put it exactly where the nodule is in the source study. Intensities go back from
the ingestion window to Hounsfield units.

The DICOM series carries pseudonyms only: patient name and id are the subject
pseudonym, UIDs are derived from pseudonyms, no birth date, accession or institution.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np

from cohortcast.io.volume import Volume


def to_hu(image: np.ndarray, hu_window: tuple[float, float], normalise: str) -> np.ndarray:
    """Inverse of data.transforms.window (inside the window)."""
    low, high = hu_window
    unit = (np.asarray(image, np.float32) + 1.0) / 2.0 if normalise == "minus_one_one" else np.asarray(image)
    return (unit * (high - low) + low).astype(np.float32)


def forecast_volume(images: np.ndarray, affine: np.ndarray) -> Volume:
    """(H, W) or (N, H, W) images -> a Volume on the crop's grid `affine` (N stacked as
    slices at the same position would be wrong: samples go to separate files, see
    write_case_images)."""
    array = np.asarray(images, np.float32)
    array = array[None] if array.ndim == 2 else array
    return Volume(array, np.asarray(affine, np.float64).reshape(4, 4))


def _is_axial(affine: np.ndarray) -> bool:
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    return bool(abs(normal[2]) > 0.999 * np.linalg.norm(normal))


def write_case_images(
    folder: Path,
    mean_hu: np.ndarray,
    variance: np.ndarray,
    samples_hu: np.ndarray,
    affine: np.ndarray,
    subject: str,
    case_key: str,
    target_date: dt.date,
    dicom: bool = True,
) -> None:
    """mean.nii.gz (HU), variance.nii.gz (normalised units^2), samples.nii.gz (4D, one
    sample per volume) and, if asked, dicom/ (the mean as a derived CT series), all on
    the baseline crop's grid `affine` ((column, row, 0, 1) -> LPS mm, 4x4 or flat 16)."""
    import nibabel as nib

    from cohortcast.io.nifti import write_nifti

    grid = forecast_volume(mean_hu, affine)
    write_nifti(grid, folder / "mean.nii.gz", dtype=np.float32)
    write_nifti(forecast_volume(variance, affine), folder / "variance.nii.gz", dtype=np.float32)
    stack = np.transpose(np.asarray(samples_hu, np.float32), (2, 1, 0))[:, :, None, :]  # (i, j, 1, N)
    image = nib.Nifti1Image(stack, grid.to_nifti_affine())
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(folder / "samples.nii.gz"))
    if dicom:
        from cohortcast.io.dicom import DicomIdentity, write_ct_series

        plane = "AXIAL" if _is_axial(grid.affine) else "OTHER"  # ImageType value 3 names the plane
        identity = DicomIdentity(
            patient_name=subject,
            patient_id=subject,
            birth_date=None,
            sex="O",
            accession="",
            institution="",
            study_date=target_date,
            # Content-addressed: a rerun of the same forecast keeps its UIDs, another
            # model's forecast of the same case gets new ones.
            uid_seed=f"cohortcast-forecast:{case_key}:{hashlib.sha256(np.ascontiguousarray(mean_hu).tobytes()).hexdigest()}",
            series_description="cohortcast forecast (mean of samples)",
            image_type=("DERIVED", "SECONDARY", plane),
            manufacturer="cohortcast",
        )
        write_ct_series(grid, folder / "dicom", identity)
