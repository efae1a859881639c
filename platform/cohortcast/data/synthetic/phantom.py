"""Chest-CT-like phantom in Hounsfield units: body with a fat layer, two lungs,
mediastinum, spine, branching vessels, nodules with realistic attenuation and
margins, fibrosis-like reticulation that progresses, and scanner noise.

Geometry: array (Z, Y, X); world LPS mm with x = (i - X/2) * ps, y = (j - Y/2) * ps,
z = k * st. Anatomy depends only on the patient's seed, so all of a patient's exams
show the same body; only nodules, fibrosis and noise change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cohortcast.data.synthetic.clinical import GGO, PART_SOLID, POORLY, SPICULATED, Nodule, NoduleState

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BONE = -1000.0, -850.0, -100.0, 40.0, 700.0
HU_SOLID_NODULE, HU_GGO, HU_VESSEL = 30.0, -520.0, 40.0


@dataclass
class Grid:
    shape: tuple[int, int, int]  # (Z, Y, X)
    pixel_mm: float
    slice_mm: float

    def affine(self) -> np.ndarray:
        z, y, x = self.shape
        aff = np.diag([self.pixel_mm, self.pixel_mm, self.slice_mm, 1.0])
        aff[:3, 3] = (-(x / 2) * self.pixel_mm, -(y / 2) * self.pixel_mm, 0.0)
        return aff

    def world_axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z, y, x = self.shape
        return (
            np.arange(z) * self.slice_mm,
            (np.arange(y) - y / 2) * self.pixel_mm,
            (np.arange(x) - x / 2) * self.pixel_mm,
        )


@dataclass
class Anatomy:
    hu: np.ndarray  # (Z, Y, X) noiseless background
    lung: np.ndarray  # (Z, Y, X) bool
    lung_boxes: dict[str, tuple[np.ndarray, np.ndarray]]  # side -> (min xyz mm, max xyz mm)


def _segment_distance(px, py, pz, a, b):
    """Distance from grid points to the segment a-b (all mm)."""
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / max(float(ab @ ab), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2), t


def make_anatomy(rng: np.random.Generator, grid: Grid) -> Anatomy:
    zz, yy, xx = grid.world_axes()
    Z, Y, X = np.meshgrid(zz, yy, xx, indexing="ij")
    fov = grid.shape[2] * grid.pixel_mm
    height = grid.shape[0] * grid.slice_mm
    a, b = fov * rng.uniform(0.40, 0.45), fov * rng.uniform(0.28, 0.32)
    body_r = (X / a) ** 2 + (Y / b) ** 2
    hu = np.full(grid.shape, HU_AIR, dtype=np.float32)
    hu[body_r < 1.0] = HU_FAT
    hu[body_r < 0.84] = HU_SOFT

    lung = np.zeros(grid.shape, dtype=bool)
    boxes = {}
    zc, zr = height * 0.5, height * rng.uniform(0.45, 0.5)
    for side, sign in (("right", -1.0), ("left", 1.0)):  # LPS: patient's right is -x
        cx, cy = sign * fov * 0.17, -fov * 0.02
        rx, ry = fov * rng.uniform(0.12, 0.14), fov * rng.uniform(0.17, 0.2)
        inside = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - zc) / zr) ** 2 < 1.0
        lung |= inside
        boxes[side] = (np.array([cx - rx, cy - ry, zc - zr]), np.array([cx + rx, cy + ry, zc + zr]))
    hu[lung] = HU_LUNG

    # Spine: a bright cortical ring around cancellous bone, behind the mediastinum.
    spine_r = np.sqrt(X**2 + (Y - fov * 0.2) ** 2)
    hu[spine_r < fov * 0.05] = HU_BONE
    hu[spine_r < fov * 0.035] = 250.0

    # Vessels: tapered tubes branching out from each hilum, only inside the lungs.
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lo, hi = boxes[side]
        hilum = np.array([sign * fov * 0.09, 0.0, zc])
        for _ in range(6):
            tip = rng.uniform(lo, hi)
            d, t = _segment_distance(X, Y, Z, hilum, tip)
            radius = np.maximum(grid.pixel_mm * 0.6, 3.0 * (1.0 - 0.7 * t))
            hu[(d < radius) & lung] = HU_VESSEL
    return Anatomy(hu=hu, lung=lung, lung_boxes=boxes)


def nodule_centre(anatomy: Anatomy, nodule: Nodule) -> np.ndarray:
    lo, hi = anatomy.lung_boxes[nodule.side]
    return lo + nodule.rel_position * (hi - lo)


def render_nodule(hu: np.ndarray, grid: Grid, centre_mm: np.ndarray, nodule: Nodule, state: NoduleState) -> None:
    """Paint one nodule into `hu` in place: an ellipsoid with the state's diameters,
    edge sharpness by margin type, star-shaped spicules, solid core if part solid."""
    zz, yy, xx = grid.world_axes()
    half = state.long_mm * 0.9 + 6.0
    sl = []
    for coords, c in zip((zz, yy, xx), (centre_mm[2], centre_mm[1], centre_mm[0])):
        idx = np.flatnonzero(np.abs(coords - c) <= half)
        if idx.size == 0:
            return
        sl.append(slice(idx[0], idx[-1] + 1))
    Z, Y, X = np.meshgrid(zz[sl[0]] - centre_mm[2], yy[sl[1]] - centre_mm[1], xx[sl[2]] - centre_mm[0], indexing="ij")
    ca, sa = np.cos(nodule.angle), np.sin(nodule.angle)
    u, v = X * ca + Y * sa, -X * sa + Y * ca
    a, b = state.long_mm / 2, state.perp_mm / 2
    c = (a + b) / 2
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (Z / c) ** 2)
    if state.margins == SPICULATED:
        phi = np.arctan2(v, u)
        r = r / (1.0 + 0.45 * np.maximum(0.0, np.cos(7 * phi + nodule.spike_phase)) ** 12)
    edge_mm = {POORLY: 1.6, SPICULATED: 0.5}.get(state.margins, 0.35)
    weight = 1.0 / (1.0 + np.exp(-(1.0 - r) * a / edge_mm))
    value = np.full(r.shape, HU_SOLID_NODULE, dtype=np.float32)
    if state.attenuation == GGO:
        value[:] = HU_GGO
    elif state.attenuation == PART_SOLID:
        core = 1.0 / (1.0 + np.exp(-(0.5 - r) * a / 0.4))
        value = HU_GGO + (HU_SOLID_NODULE - HU_GGO) * core
    region = hu[sl[0], sl[1], sl[2]]
    hu[sl[0], sl[1], sl[2]] = region * (1 - weight) + value * weight


def fibrosis_score(rng_seed: int, anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Fibrosis propensity: a smooth random field biased to peripheral, basal, posterior
    lung. A patient's fibrosis is a threshold of it at every exam."""
    rng = np.random.default_rng(rng_seed)
    field = ndimage.gaussian_filter(rng.standard_normal(grid.shape).astype(np.float32), sigma=2.0)
    field /= field.std() + 1e-6
    Z, Y, X = np.meshgrid(*[np.linspace(0, 1, n) for n in grid.shape], indexing="ij")
    peripheral = ndimage.distance_transform_edt(anatomy.lung, sampling=(grid.slice_mm, grid.pixel_mm, grid.pixel_mm))
    bias = 1.5 * (1 - Z) + 1.2 * Y - 0.08 * peripheral
    return field + bias


def fibrosis_mask(rng_seed: int, anatomy: Anatomy, grid: Grid, extent: float) -> np.ndarray:
    """Fibrosis-like region growing with `extent` (0..1): the same random field with a
    lower threshold, so masks only grow (the NAMD cohort's "linear" model)."""
    threshold = 2.6 - 3.0 * np.clip(extent, 0.0, 1.0)
    return anatomy.lung & (fibrosis_score(rng_seed, anatomy, grid) > threshold)


def render_fibrosis(hu: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    reticulation = -650.0 + 250.0 * rng.random(mask.sum()).astype(np.float32)
    hu[mask] = reticulation


def add_noise(hu: np.ndarray, rng: np.random.Generator, sigma_hu: float) -> np.ndarray:
    # Low-dose CT noise is spatially correlated: smooth white noise slightly, rescale.
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), sigma=(0, 0.7, 0.7))
    noise *= sigma_hu / (noise.std() + 1e-6)
    return np.clip(hu + noise, -1024.0, 3071.0)
