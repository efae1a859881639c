"""Metrics for the NAMD evaluation (Sec. 4.1.2, 4.3, Table 1).

Classification metrics are scikit-learn's; the Frechet distance is the formula of
Heusel et al. (FID) with scipy's matrix square root, as pytorch-fid computes it. Every
Frechet distance carries the name of the feature space it was computed in, so an
Inception FID and a distance in another network's features are never mixed up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


def classification_metrics(labels, scores) -> dict[str, float]:
    """AUROC and AUPRC (average precision) of malignancy scores; labels in {0, 1}."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.shape[0]} labels for {scores.shape[0]} scores")
    if len(np.unique(labels)) != 2:
        raise ValueError(f"AUROC needs both classes; labels hold only {np.unique(labels).tolist()}")
    return {"auroc": float(roc_auc_score(labels, scores)), "auprc": float(average_precision_score(labels, scores))}


def over_seeds(per_seed: list[dict[str, float]]) -> dict[str, MeanStd]:
    """Mean and (population) std of each metric over seeds, as Table 1 reports them."""
    if not per_seed:
        raise ValueError("no seeds to summarise")
    keys = per_seed[0].keys()
    return {k: MeanStd(float(np.mean([m[k] for m in per_seed])), float(np.std([m[k] for m in per_seed])),
                       len(per_seed)) for k in keys}


@dataclass(frozen=True)
class FrechetDistance:
    value: float
    feature_space: str  # e.g. "inception-v3 pool3" or "evaluator ViT [CLS]"
    n_real: int
    n_generated: int


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: nudge both diagonals (pytorch-fid)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in the matrix square root")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_of_features(real: np.ndarray, generated: np.ndarray, feature_space: str) -> FrechetDistance:
    """Feature matrices (n, d) -> Frechet distance between their Gaussian fits."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    if min(len(real), len(generated)) < 2:
        raise ValueError("the Frechet distance needs at least 2 feature vectors on each side")
    value = frechet_distance(real.mean(0), np.cov(real, rowvar=False), generated.mean(0),
                             np.cov(generated, rowvar=False))
    return FrechetDistance(value, feature_space, len(real), len(generated))


def running_variance(samples: np.ndarray) -> np.ndarray:
    """samples (N, ...) -> (N, ...): unbiased variance over the first k samples, k = 1..N
    (0 for k = 1), by Welford's update: NAMD App. D's variance against sample count."""
    samples = np.asarray(samples, np.float64)
    mean = np.zeros(samples.shape[1:])
    m2 = np.zeros(samples.shape[1:])
    out = np.zeros_like(samples)
    for k, x in enumerate(samples, start=1):
        delta = x - mean
        mean += delta / k
        m2 += delta * (x - mean)
        out[k - 1] = m2 / (k - 1) if k > 1 else 0.0
    return out
