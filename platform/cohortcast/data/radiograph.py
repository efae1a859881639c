"""A single-plane image (DX/CR radiograph, or any one-slice study) as a fixed-size
square image with its grid: the CLDM's 2D input.

The grid lies in the image's own plane, along its row and column directions, centred
on the image and covering its longer side (the shorter one is padded black), so the
pixels keep their physical aspect ratio whatever the detector's shape. Its affine
follows io.crop's convention ((column, row, 0, 1) -> LPS mm, flattened 4x4 in the
tables). Intensities: radiographs have no calibrated unit like HU, so each image is
windowed on its own 0.5-99.5 percentiles (robust to burnt-in labels and collimator
edges) and scaled to [-1, 1], brighter = more attenuation (MONOCHROME1 inverted).
"""

from __future__ import annotations

import numpy as np

from cohortcast.data.transforms import antialias_sigma, apply_axis, axis_weights
from cohortcast.io.crop import Crop, grid_affine
from cohortcast.io.volume import Volume

PERCENTILES = (0.5, 99.5)


def percentile_window(image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Clip to the image's own percentiles and scale to [0, 1]; a flat image is all 0."""
    lo, hi = np.percentile(image, percentiles)
    if not hi > lo:
        return np.zeros(image.shape, np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def radiograph_image(volume: Volume, size: int, antialias: bool = True) -> Crop:
    """A one-slice Volume -> (size, size) image in [-1, 1] on a square grid in its plane.
    Shrinking is anti-aliased (Gaussian prefilter, antialias_sigma per axis)."""
    if volume.shape[0] != 1:
        raise ValueError(f"radiograph_image takes a one-slice volume, got shape {volume.shape}")
    image = volume.array[0]
    rows, cols = image.shape
    col_mm, row_mm = (float(s) for s in volume.spacing[:2])
    spacing = max(cols * col_mm, rows * row_mm) / size  # the longer side fills the grid
    centre = volume.voxel_to_world(np.array([[(cols - 1) / 2.0, (rows - 1) / 2.0, 0.0]]))[0]
    affine = grid_affine(centre, volume.direction[:, 0], volume.direction[:, 1], size, spacing)

    unit = percentile_window(image)
    if volume.metadata.get("photometric") == "MONOCHROME1":
        unit = 1.0 - unit
    offsets = np.arange(size) - (size - 1) / 2.0  # output index -> source index, centre on centre
    out = unit
    for axis, n, mm in ((0, rows, row_mm), (1, cols, col_mm)):
        factor = spacing / mm
        sigma = antialias_sigma(factor) if antialias else 0.0
        out = apply_axis(out, axis_weights(n, offsets * factor + (n - 1) / 2.0, sigma, pad=True), axis)
    # Padding comes out as 0 (all-zero weights): black, the window's low end.
    return Crop(np.clip(out * 2.0 - 1.0, -1.0, 1.0).astype(np.float32), affine)
