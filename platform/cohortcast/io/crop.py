"""A 2D crop with the patient-space grid it was sampled on (MONAI-style: the pixels
never travel without their geometry).

`affine` maps the crop's index column vector (i = column, j = row, k, 1) to DICOM
patient coordinates in mm (LPS), as Volume.affine does for k = 0; its third column is
the plane's normal (column x row direction) scaled by the pixel spacing, so the 4x4
stays invertible and a one-slice Volume built from it is a proper grid. Whoever cuts
the crop builds the affine (data.transforms.nodule_crop); whoever writes images of it
(inference.forecast_outputs, serving) takes the affine as is instead of re-deriving
an axial one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohortcast.io.volume import Volume


def grid_affine(centre_lps, column_axis, row_axis, size: int, spacing_mm: float) -> np.ndarray:
    """Affine of a (size, size) grid `spacing_mm` apart whose middle (index (size - 1) / 2
    along both axes) is `centre_lps`; columns step along `column_axis`, rows along
    `row_axis` (unit vectors in LPS)."""
    column_axis = np.asarray(column_axis, np.float64)
    row_axis = np.asarray(row_axis, np.float64)
    affine = np.eye(4)
    affine[:3, 0] = column_axis * spacing_mm
    affine[:3, 1] = row_axis * spacing_mm
    affine[:3, 2] = np.cross(column_axis, row_axis) * spacing_mm
    half = (size - 1) / 2.0 * spacing_mm
    affine[:3, 3] = np.asarray(centre_lps, np.float64) - half * column_axis - half * row_axis
    return affine


def axial_grid_affine(centre_lps, size: int, spacing_mm: float) -> np.ndarray:
    """The axial grid (columns +x, rows +y): how a CT crop is laid out, and the only
    guess left for forecasts of cohorts ingested before crop affines were stored."""
    return grid_affine(centre_lps, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], size, spacing_mm)


@dataclass(frozen=True)
class Crop:
    array: np.ndarray  # (H, W): [row j, column i]
    affine: np.ndarray  # (4, 4): (i, j, k, 1) -> LPS mm

    def __post_init__(self) -> None:
        if np.ndim(self.array) != 2:
            raise ValueError(f"Crop.array must be 2D (H, W), got shape {np.shape(self.array)}")
        if np.shape(self.affine) != (4, 4):
            raise ValueError(f"Crop.affine must be 4x4, got {np.shape(self.affine)}")

    @property
    def centre_lps(self) -> np.ndarray:
        """Patient-space position of the crop's middle (between pixels for even sizes)."""
        h, w = np.shape(self.array)
        return (self.affine @ np.array([(w - 1) / 2.0, (h - 1) / 2.0, 0.0, 1.0]))[:3]

    def with_array(self, array: np.ndarray) -> Crop:
        """Same grid, other pixels (windowed intensities, a forecast of this crop)."""
        return Crop(np.asarray(array), self.affine)

    def volume(self, images: np.ndarray | None = None) -> Volume:
        """A one-slice Volume on this grid, of the crop or of `images` (H, W) made on it."""
        array = np.asarray(self.array if images is None else images, np.float32)
        return Volume(array[None], np.array(self.affine, np.float64))
