"""The CLDM additions to the chest phantom: a heart whose size sets the cardiothoracic
ratio, pleural fluid at the lung bases, trend-model fibrosis masks (quantiles of
phantom.fibrosis_score), and the chest
radiograph as a projection of the same phantom.

Radiograph: a parallel anterior-posterior projection. Linear attenuation from HU,
mu = MU_WATER (1 + HU / 1000) at an effective ~60 keV, integrated along y (the line
integral, unitless); transmitted photons N = N0 exp(-integral) with Poisson noise; the
log image -ln(N / N0) passes through a film-like characteristic curve (a sigmoid), so
bone and heart are bright and aerated lung dark (MONOCHROME2). Rows run head to feet,
columns from the patient's right to left (a chest film as displayed; DICOM
PatientOrientation ["L", "F"]).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cohortcast.data.synthetic.phantom import Anatomy, Grid
from cohortcast.data.synthetic.radiograph_reports import EFFUSION_HEIGHT

HU_HEART, HU_FLUID = 40.0, 15.0
MU_WATER = 0.019  # 1/mm
PHOTONS = 20000.0  # per detector pixel, unattenuated
FILM_CENTRE, FILM_WIDTH = 2.4, 0.75  # characteristic curve on the log image
STORED_MAX = 4095  # 12-bit pixels


def thorax_width_mm(anatomy: Anatomy) -> float:
    """The widest inner thoracic diameter: from the right lung's to the left lung's outer edge."""
    return float(anatomy.lung_boxes["left"][1][0] - anatomy.lung_boxes["right"][0][0])


def with_heart(anatomy: Anatomy, grid: Grid, ctr: float) -> Anatomy:
    """The anatomy with a heart: an ellipsoid in the anterior lower chest whose widest
    transverse diameter is `ctr` x the thoracic width, a third of it right of the midline
    and two thirds left (+x, LPS), displacing the lungs."""
    zz, yy, xx = grid.world_axes()
    Z, Y, X = np.meshgrid(zz, yy, xx, indexing="ij")
    rx = ctr * thorax_width_mm(anatomy) / 2
    lo, hi = anatomy.lung_boxes["left"]
    zc, zr = (lo[2] + hi[2]) / 2, (hi[2] - lo[2]) / 2
    ly = (lo[1] + hi[1]) / 2, (hi[1] - lo[1]) / 2
    rz = 0.55 * zr
    centre = (rx / 3, ly[0] - 0.3 * ly[1], zc - 0.9 * zr + rz)
    heart = ((X - centre[0]) / rx) ** 2 + ((Y - centre[1]) / (0.75 * rx)) ** 2 + ((Z - centre[2]) / rz) ** 2 < 1.0
    hu = anatomy.hu.copy()
    hu[heart] = HU_HEART
    return Anatomy(hu=hu, lung=anatomy.lung & ~heart, lung_boxes=anatomy.lung_boxes)


def effusion_region(anatomy: Anatomy, grid: Grid, severity: int, side: str) -> np.ndarray:
    """Pleural fluid in the lung base(s): lung below a level that rises towards the lateral
    chest wall (the meniscus of an upright film). Empty for severity 0."""
    region = np.zeros(grid.shape, dtype=bool)
    if severity == 0:
        return region
    zz, yy, xx = grid.world_axes()
    Z, _, X = np.meshgrid(zz, yy, xx, indexing="ij", sparse=True)
    for name, sign in (("right", -1.0), ("left", 1.0)):
        if side not in (name, "bilateral"):
            continue
        lo, hi = anatomy.lung_boxes[name]
        height = hi[2] - lo[2]
        centre_x, half_x = (lo[0] + hi[0]) / 2, (hi[0] - lo[0]) / 2
        lateral = np.clip(sign * (X - centre_x) / half_x, 0.0, 1.0)
        level = lo[2] + height * EFFUSION_HEIGHT[severity] * (1.0 + 0.5 * lateral**2)
        region |= (Z < level) & (sign * X > 0)
    return region & anatomy.lung


def quantile_mask(score: np.ndarray, lung: np.ndarray, fraction: float) -> np.ndarray:
    """The round(fraction x lung voxels) lung voxels of highest score: one threshold of a
    fixed field, so a patient's masks are nested and spatially coherent across exams."""
    idx = np.flatnonzero(lung)
    n = int(round(float(np.clip(fraction, 0.0, 1.0)) * idx.size))
    mask = np.zeros(score.size, dtype=bool)
    if n:
        order = np.argsort(-score.ravel()[idx], kind="stable")
        mask[idx[order[:n]]] = True
    return mask.reshape(score.shape)


def radiograph_geometry(grid: Grid, pixel_mm: float) -> tuple[int, int]:
    """(rows, columns) of a detector with `pixel_mm` pitch covering the CT's field."""
    z, _, x = grid.shape
    return max(1, int(round(z * grid.slice_mm / pixel_mm))), max(1, int(round(x * grid.pixel_mm / pixel_mm)))


def line_integral(hu: np.ndarray, grid: Grid, pixel_mm: float) -> np.ndarray:
    """(rows, cols) attenuation line integral along y on the detector grid."""
    mu = MU_WATER * np.clip(1.0 + hu / 1000.0, 0.0, None)
    proj = mu.sum(axis=1) * grid.pixel_mm  # (Z, X)
    # Anti-aliasing before a coarser detector (sigma = (factor - 1) / 2, the skimage rule).
    sigma = (max(0.0, (pixel_mm / grid.slice_mm - 1) / 2), max(0.0, (pixel_mm / grid.pixel_mm - 1) / 2))
    if any(sigma):
        proj = ndimage.gaussian_filter(proj, sigma)
    rows, cols = radiograph_geometry(grid, pixel_mm)
    z, _, x = grid.shape
    # Row r's centre lies (r + 0.5) pitches below the top of the field (the last slice's top edge).
    k = (z * grid.slice_mm - (np.arange(rows) + 0.5) * pixel_mm) / grid.slice_mm - 0.5
    i = (np.arange(cols) + 0.5) * pixel_mm / grid.pixel_mm - 0.5
    kk, ii = np.meshgrid(k, i, indexing="ij")
    return ndimage.map_coordinates(proj, [kk, ii], order=1, mode="nearest")


def expose(integral: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Line integral -> noisy transmission -> log image -> film curve -> 12-bit uint16."""
    counts = rng.poisson(PHOTONS * np.exp(-integral))
    log_image = -np.log(np.maximum(counts, 1) / PHOTONS)
    film = 1.0 / (1.0 + np.exp(-(log_image - FILM_CENTRE) / FILM_WIDTH))
    return np.rint(STORED_MAX * film).astype(np.uint16)
