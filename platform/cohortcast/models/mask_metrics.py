"""Mask volume metrics shared by the CLDM stages' validation (training) and evaluation:
pure numpy on binary masks of one grid, so `training` needs nothing from `evaluation`.

aVD (CLDM Table 1) = |V_pred - V_true| / V_lung, volumes as voxel counts on the grid
the masks and the lung count share (the ingested grid)."""

from __future__ import annotations

import numpy as np


def mask_volumes(masks: np.ndarray) -> np.ndarray:
    """(B, *grid) 0/1 -> (B,) voxel counts (float64)."""
    return masks.reshape(len(masks), -1).astype(bool).sum(1).astype(np.float64)


def volume_avd(pred_voxels: np.ndarray, true_voxels: np.ndarray, lung_voxels: np.ndarray) -> np.ndarray:
    """(B,) |V_pred - V_true| / V_lung from voxel counts; NaN where the lung count is
    unknown (0): a caller averages with np.nanmean or drops those rows."""
    lung = np.asarray(lung_voxels, np.float64)
    diff = np.abs(np.asarray(pred_voxels, np.float64) - np.asarray(true_voxels, np.float64))
    return np.where(lung > 0, diff / np.where(lung > 0, lung, 1.0), np.nan)


def mask_dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(B,) Dice of binary masks; 1 where both are empty (nothing to find, nothing found)."""
    p, t = pred.reshape(len(pred), -1).astype(bool), true.reshape(len(true), -1).astype(bool)
    denom = p.sum(1) + t.sum(1)
    return np.where(denom > 0, 2.0 * (p & t).sum(1) / np.maximum(denom, 1), 1.0)
