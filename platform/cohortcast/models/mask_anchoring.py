"""Anchoring a forecast mask to the last prior's known mask (our addition; the paper
decodes the forecast latent alone).

On the debug cohort the segmentation decoder's own error on the TRUE target's tokens
(val aVD ~0.07) is three times copy-last's (~0.02): decoded alone, no forecast can beat
copying the last mask, whatever it predicts. The decoder's bias, though, is much the
same for two studies of one patient, so its *difference* carries the change. Anchored:

- volume: V = V_prior_true + (sum p_forecast - sum p_prior), the decoded soft-volume
  change added to the prior's real volume (p: the decoder's sigmoid probabilities; for
  a multi-sample forecast p_forecast is the mean of the samples' probabilities);
- mask: the prior's real mask edited to that volume: growth adds the most probable
  voxels outside it (by p_forecast - p_prior), shrinkage removes the least probable
  inside it. Copy-last is the special case of a forecast that decodes like its prior.

It needs the last prior's mask at forecast time, as copy-last does (in the CLDM paper's
cohort every scan was annotated)."""

from __future__ import annotations

import numpy as np


def anchored_volume(prob_forecast: np.ndarray, prob_prior: np.ndarray, prior_mask: np.ndarray) -> float:
    """Voxels: the prior's true volume plus the decoded soft-volume change (>= 0)."""
    change = float(np.sum(prob_forecast, dtype=np.float64) - np.sum(prob_prior, dtype=np.float64))
    return max(0.0, float(np.count_nonzero(prior_mask)) + change)


def anchored_mask(prob_forecast: np.ndarray, prob_prior: np.ndarray, prior_mask: np.ndarray) -> np.ndarray:
    """uint8 mask of the prior's grid: the prior's mask grown or shrunk to the anchored
    volume, voxels ranked by how much more (less) diseased the forecast decodes them
    than the prior."""
    prior = np.asarray(prior_mask).astype(bool)
    if prob_forecast.shape != prior.shape or prob_prior.shape != prior.shape:
        raise ValueError(
            f"shapes differ: forecast {prob_forecast.shape}, prior probabilities {prob_prior.shape}, prior mask "
            f"{prior.shape}"
        )
    target = int(round(anchored_volume(prob_forecast, prob_prior, prior)))
    have = int(prior.sum())
    out = prior.copy().reshape(-1)
    rise = (np.asarray(prob_forecast, np.float64) - np.asarray(prob_prior, np.float64)).reshape(-1)
    if target > have:
        candidates = np.flatnonzero(~out)
        take = candidates[np.argsort(-rise[candidates], kind="stable")[: target - have]]
        out[take] = True
    elif target < have:
        candidates = np.flatnonzero(out)
        drop = candidates[np.argsort(rise[candidates], kind="stable")[: have - target]]
        out[drop] = False
    return out.reshape(prior.shape).astype(np.uint8)
