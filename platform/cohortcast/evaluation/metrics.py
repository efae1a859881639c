"""Metrics for the NAMD evaluation (Sec. 4.1.2, 4.3, Table 1).

Classification metrics are scikit-learn's; the Frechet distance is the formula of
Heusel et al. (FID) with scipy's matrix square root, as pytorch-fid computes it. Every
Frechet distance carries the name of the feature space it was computed in, so an
Inception FID and a distance in another network's features are never mixed up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    return {
        k: MeanStd(float(np.mean([m[k] for m in per_seed])), float(np.std([m[k] for m in per_seed])), len(per_seed))
        for k in keys
    }


def mean_auroc(labels, scores) -> float:
    """Mean over runs of the AUROC of scores (runs, n) against labels (n,) in {0, 1}.

    The Mann-Whitney form (rank sum of the positives, ties ranked half-way) equals
    scikit-learn's roc_auc_score; it is used because the patient bootstrap calls this
    thousands of times per Table-1 row, and ranking all runs at once is far cheaper."""
    from scipy.stats import rankdata

    labels, scores = np.asarray(labels), np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if labels.ndim != 1 or scores.shape[1] != labels.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for scores of shape {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1; got {np.unique(labels).tolist()}")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; labels hold only {np.unique(labels).tolist()}")
    ranks = rankdata(scores, axis=1)
    auc = (ranks[:, positive].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(auc.mean())


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    n_boot_used: int  # resamples that gave a value (one-class resamples are skipped)

    def __str__(self) -> str:
        return f"[{self.low:.3f}, {self.high:.3f}]"


def patient_bootstrap(
    patients: Sequence[str],
    statistic: Callable[[np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Percentile CI of statistic(case_indices) under a cluster bootstrap over patients.

    A patient's nodules are correlated, so patients, not cases, are the independent
    units: each resample draws len(unique patients) patients with replacement (with
    np.random.default_rng(seed).integers over the patients in sorted order) and takes
    all cases of every drawn patient, once per draw. Resamples on which statistic raises
    ValueError (e.g. AUROC on one class) are skipped; if fewer than half survive the
    interval would describe a biased subset, so that is an error."""
    patients = np.asarray(patients)
    if patients.ndim != 1 or len(patients) == 0:
        raise ValueError("patient_bootstrap needs a non-empty 1-d sequence of patient ids, one per case")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    unique, patient_of_case = np.unique(patients, return_inverse=True)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        draws = np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))
        # A case appears as often as its patient was drawn; statistics here ignore order.
        idx = np.repeat(np.arange(len(patients)), draws[patient_of_case])
        try:
            values.append(float(statistic(idx)))
        except ValueError:
            continue
    if 2 * len(values) < n_boot:
        raise ValueError(
            f"only {len(values)} of {n_boot} patient bootstrap resamples gave a value "
            "(e.g. a single class); too few patients for a confidence interval"
        )
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(float(low), float(high), len(values))


def paired_bootstrap(
    patients: Sequence[str],
    statistic_a: Callable[[np.ndarray], float],
    statistic_b: Callable[[np.ndarray], float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """CI of statistic_a - statistic_b, both evaluated on the same patient resample each
    time, so the case mix the two methods share cancels out of the interval (a method
    against itself gives exactly [0, 0])."""
    return patient_bootstrap(patients, lambda idx: statistic_a(idx) - statistic_b(idx), n_boot, seed, level)


def mean_of_cases(values) -> Callable[[np.ndarray], float]:
    """A bootstrap statistic: the mean of per-case values over the resampled cases, NaN
    (an undefined case, e.g. a Dice of two empty masks where that is undefined) left out.
    A resample without any defined case raises ValueError, so patient_bootstrap skips it."""
    values = np.asarray(values, np.float64)

    def statistic(idx: np.ndarray) -> float:
        chosen = values[idx]
        chosen = chosen[~np.isnan(chosen)]
        if chosen.size == 0:
            raise ValueError("no defined case in this resample")
        return float(chosen.mean())

    return statistic


@dataclass(frozen=True)
class FrechetDistance:
    value: float
    feature_space: str  # e.g. "inception-v3 pool3" or "evaluator ViT [CLS]"
    n_real: int
    n_generated: int


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
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
    value = frechet_distance(
        real.mean(0), np.cov(real, rowvar=False), generated.mean(0), np.cov(generated, rowvar=False)
    )
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
