"""An image with its geometry attached (MONAI-style: data never travels without it).

Conventions, fixed once here so every reader and writer agrees:
- `array` is indexed [k, j, i] = (slice, row, column), shape (Z, Y, X), in Hounsfield
  units for CT (modality-native intensities otherwise), float32.
- `affine` maps the voxel index column vector (i, j, k, 1) to DICOM patient
  coordinates in millimetres, LPS (+x towards the patient's left, +y posterior,
  +z head). NIfTI's RAS affine is converted on read (x and y negated).
- A 2D radiograph is a volume with Z = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# RAS <-> LPS differ by the sign of the first two world axes.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray  # (Z, Y, X)
    affine: np.ndarray  # (4, 4): (i, j, k, 1) -> LPS mm
    modality: str = "CT"
    metadata: dict = field(default_factory=dict)  # non-identifying facts only

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (Z, Y, X), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along (i, j, k) = (column, row, slice)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the i, j, k axes (columns) in LPS."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3].copy()

    def world_to_voxel(self, points_lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous voxel indices (i, j, k)."""
        inv = np.linalg.inv(self.affine)
        pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        pts = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return pts @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_nifti_affine(self) -> np.ndarray:
        """RAS affine for writing this volume (transposed to (X, Y, Z)) with nibabel."""
        return RAS_TO_LPS @ self.affine


def affine_from_dicom(
    position: np.ndarray, orientation: np.ndarray, row_spacing: float, col_spacing: float, slice_step: np.ndarray
) -> np.ndarray:
    """Affine from DICOM geometry. ImageOrientationPatient holds the direction of
    increasing column index (first 3) then of increasing row index (last 3);
    PixelSpacing is (row spacing, column spacing); `slice_step` is the LPS vector
    from one slice origin to the next."""
    row_dir = np.asarray(orientation[:3], dtype=np.float64)  # along i (columns)
    col_dir = np.asarray(orientation[3:], dtype=np.float64)  # along j (rows)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = slice_step
    affine[:3, 3] = position
    return affine
