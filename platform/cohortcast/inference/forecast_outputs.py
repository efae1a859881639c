"""A forecast as images a radiologist can open next to the real scans.

Ingestion samples each crop on a grid in patient space (LPS mm) around the nodule:
columns along +x, rows along +y, `crop_spacing_mm` apart, centred on the finding
(`data.transforms.axial_crop`). The same grid gives the forecast's geometry, so its
NIfTI affine and DICOM position/orientation/spacing put it exactly where the nodule is
in the source study. Intensities go back from the ingestion window to Hounsfield units.

The DICOM series carries pseudonyms only: patient name and id are the subject
pseudonym, UIDs are derived from pseudonyms, no birth date, accession or institution.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from cohortcast.io.volume import Volume


def crop_affine(centre_lps, size: int, spacing_mm: float) -> np.ndarray:
    """(i = column, j = row, k = slice) -> LPS mm for an axial crop centred on `centre_lps`."""
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    offset = (size - 1) / 2.0 * spacing_mm
    affine[:3, 3] = np.asarray(centre_lps, np.float64) - np.array([offset, offset, 0.0])
    return affine


def to_hu(image: np.ndarray, hu_window: tuple[float, float], normalise: str) -> np.ndarray:
    """Inverse of data.transforms.window (inside the window)."""
    low, high = hu_window
    unit = (np.asarray(image, np.float32) + 1.0) / 2.0 if normalise == "minus_one_one" else np.asarray(image)
    return (unit * (high - low) + low).astype(np.float32)


def forecast_volume(images: np.ndarray, centre_lps, spacing_mm: float) -> Volume:
    """(H, W) or (N, H, W) images -> a Volume on the crop grid (N stacked as slices at the
    same position would be wrong: samples go to separate files, see write_case_images)."""
    array = np.asarray(images, np.float32)
    array = array[None] if array.ndim == 2 else array
    return Volume(array, crop_affine(centre_lps, array.shape[-1], spacing_mm))


def write_case_images(
    folder: Path,
    mean_hu: np.ndarray,
    variance: np.ndarray,
    samples_hu: np.ndarray,
    centre_lps,
    spacing_mm: float,
    subject: str,
    case_key: str,
    target_date: dt.date,
    dicom: bool = True,
) -> None:
    """mean.nii.gz (HU), variance.nii.gz (normalised units^2), samples.nii.gz (4D, one
    sample per volume) and, if asked, dicom/ (the mean as a derived CT series)."""
    import nibabel as nib

    from cohortcast.io.nifti import write_nifti

    write_nifti(forecast_volume(mean_hu, centre_lps, spacing_mm), folder / "mean.nii.gz", dtype=np.float32)
    write_nifti(forecast_volume(variance, centre_lps, spacing_mm), folder / "variance.nii.gz", dtype=np.float32)
    grid = forecast_volume(mean_hu, centre_lps, spacing_mm)
    stack = np.transpose(np.asarray(samples_hu, np.float32), (2, 1, 0))[:, :, None, :]  # (i, j, 1, N)
    image = nib.Nifti1Image(stack, grid.to_nifti_affine())
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(folder / "samples.nii.gz"))
    if dicom:
        from cohortcast.io.dicom import DicomIdentity, write_ct_series

        identity = DicomIdentity(
            patient_name=subject,
            patient_id=subject,
            birth_date=None,
            sex="O",
            accession="",
            institution="",
            study_date=target_date,
            uid_seed=f"cohortcast-forecast:{case_key}",
            series_description="cohortcast forecast (mean of samples)",
            image_type=("DERIVED", "SECONDARY", "AXIAL"),
            manufacturer="cohortcast",
        )
        write_ct_series(grid, folder / "dicom", identity)
