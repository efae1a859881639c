"""Segmentation metrics of CLDM's Table 1 (the forecast ILD mask of a future CT study).

All masks of one target live on one grid, the ingested (Z, Y, X) evaluation grid of the
study (`mask`, `lung_mask`, `volume_affine`), so every volume below is measured on it:

- Dice: 2|P ∩ T| / (|P| + |T|). Two empty masks agree perfectly: 1.0 (MONAI's DiceMetric
  with ignore_empty=False), since "no fibrosis forecast, none found" is a correct forecast.
- aVD (adjusted volume difference, CLDM Sec. 4.1): |V_pred - V_true| / V_lung. V_lung is
  the target study's `lung_voxels` (its resampled `lung_mask` counted on the same grid),
  so the voxel volume cancels and the ratio is a fraction of the lung. The ingested
  `lung_volume_ml` / `mask_volume_ml` are measured on the *source* grid: mixing them with
  counts on the evaluation grid would compare two resamplings, so `avd` takes the three
  volumes in one unit from one grid (voxel counts, or ml from the same grid).
- Progression Dice: Dice of the voxels that became diseased since the last prior,
  pred_new = P & ~prior, true_new = T & ~prior. Copying the last prior gives pred_new = ∅,
  hence 0 wherever anything became diseased. Where nothing did and nothing is forecast
  (both empty) there is no progression to score: NaN, left out of means (not 1.0, which
  would reward copy-last for every stable patient).
- HD95: MONAI's 95th-percentile symmetric Hausdorff distance in mm (voxel spacing given),
  both masks empty -> 0.0, exactly one empty -> the grid's diagonal in mm (the largest
  distance the grid allows: a missed or invented lesion costs the most, and means stay
  finite where MONAI would give inf/nan).

Forecasts come as S samples of per-voxel probabilities (or binary masks) per target:
each sample thresholded at 0.5 (>=) is one per-sample forecast; the *mean forecast* is
the mean of the S sample probabilities thresholded at 0.5. Sample k of every target forms
seed run k, summarised as mean ± std over seeds (as NAMD's Table 1); the mean forecast's
mean over targets gets a patient-level bootstrap 95% CI (evaluation.metrics).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cohortcast.errors import CohortcastError
from cohortcast.evaluation.metrics import (
    Interval,
    MeanStd,
    mean_of_cases,
    over_seeds,
    paired_bootstrap,
    patient_bootstrap,
)

THRESHOLD = 0.5
METRICS = ("dice", "avd", "progression_dice", "hd95")


class SegmentationMetricError(CohortcastError, ValueError):
    """Masks or volumes that cannot be scored together (the message says which and why)."""


def _binary(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise SegmentationMetricError(f"{name} must be a binary mask (0/1 or bool); threshold probabilities first")
        mask = mask.astype(bool)
    return mask


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred, true = _binary(pred, "the predicted mask"), _binary(true, "the true mask")
    if pred.shape != true.shape:
        raise SegmentationMetricError(f"predicted mask {pred.shape} and true mask {true.shape} are on different grids")
    return pred, true


def dice(pred, true, empty: float | None = 1.0) -> float:
    """Dice of two binary masks; `empty` is the value when both are empty (None -> NaN)."""
    pred, true = _pair(pred, true)
    total = int(pred.sum()) + int(true.sum())
    if total == 0:
        return float("nan") if empty is None else float(empty)
    return 2.0 * int(np.logical_and(pred, true).sum()) / total


def progression_dice(pred, true, prior) -> float:
    """Dice of the newly diseased voxels relative to the last prior's mask; NaN when
    neither mask has any (module docstring)."""
    pred, true = _pair(pred, true)
    prior = _binary(prior, "the last prior's mask")
    if prior.shape != true.shape:
        raise SegmentationMetricError(f"last prior's mask {prior.shape} is not on the target grid {true.shape}")
    return dice(pred & ~prior, true & ~prior, empty=None)


def grid_spacing_mm(affine) -> tuple[float, float, float]:
    """Voxel spacing (mm) in array-axis order (Z, Y, X) from a 4x4 (or flattened 16)
    voxel-to-LPS affine whose columns are (i, j, k) = (X, Y, Z), as ingestion writes it."""
    matrix = np.asarray(affine, np.float64).reshape(4, 4)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)[::-1]
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise SegmentationMetricError(f"affine gives voxel spacing {spacing.tolist()} mm; expected positive and finite")
    return tuple(float(s) for s in spacing)


def volume_ml(mask, spacing_mm: Sequence[float]) -> float:
    """Mask volume in ml: voxel count x voxel volume (mm^3 / 1000)."""
    return float(_binary(mask, "mask").sum()) * float(np.prod(spacing_mm)) / 1000.0


def avd(pred_volume: float, true_volume: float, lung_volume: float) -> float:
    """|V_pred - V_true| / V_lung, the three volumes in one unit measured on one grid."""
    if not lung_volume > 0:
        raise SegmentationMetricError(
            f"lung volume {lung_volume} is not positive: aVD needs the target study's lung mask (has_lung_mask)"
        )
    if pred_volume < 0 or true_volume < 0:
        raise SegmentationMetricError(f"volumes must be >= 0, got {pred_volume} and {true_volume}")
    return abs(float(pred_volume) - float(true_volume)) / float(lung_volume)


def hd95(pred, true, spacing_mm: Sequence[float]) -> float:
    """MONAI's 95th-percentile Hausdorff distance in mm; empty masks as in the module docstring."""
    from monai.metrics import compute_hausdorff_distance

    pred, true = _pair(pred, true)
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != pred.ndim:
        raise SegmentationMetricError(f"{len(spacing)} spacings for a {pred.ndim}-d mask")
    has_pred, has_true = bool(pred.any()), bool(true.any())
    if not (has_pred or has_true):
        return 0.0
    if has_pred != has_true:
        return float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument its own get_mask_edges passes; not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        value = compute_hausdorff_distance(
            pred[None, None], true[None, None], include_background=True, percentile=95, spacing=spacing
        )
    return float(value[0, 0])


@dataclass(frozen=True)
class SegmentationTarget:
    """One forecast target on its evaluation grid: the true mask, the last prior's mask
    (for progression Dice), the lung voxel count (aVD) and the voxel spacing (HD95)."""

    patient: str  # pseudonym: the bootstrap's unit
    mask: np.ndarray
    last_prior: np.ndarray
    lung_voxels: int
    spacing_mm: tuple[float, ...]


def mask_metrics(pred, target: SegmentationTarget) -> dict[str, float]:
    """Every Table-1 metric of one binary forecast mask against its target."""
    pred, true = _pair(pred, target.mask)
    return {
        "dice": dice(pred, true),
        "avd": avd(int(pred.sum()), int(true.sum()), target.lung_voxels),
        "progression_dice": progression_dice(pred, true, target.last_prior),
        "hd95": hd95(pred, true, target.spacing_mm),
    }


def sample_masks(samples, threshold: float = THRESHOLD) -> np.ndarray:
    """(S, *grid) probabilities -> (S, *grid) per-sample masks (p >= threshold)."""
    return np.asarray(samples, np.float64) >= threshold


def mean_forecast(samples, threshold: float = THRESHOLD) -> np.ndarray:
    """(S, *grid) probabilities -> the mean forecast mask: mean over samples >= threshold."""
    return np.asarray(samples, np.float64).mean(axis=0) >= threshold


@dataclass(frozen=True)
class CaseScores:
    """One target's metrics: of the mean forecast, and of each sample (arrays of length S)."""

    mean_forecast: dict[str, float]
    per_sample: dict[str, np.ndarray]


def score_case(samples, target: SegmentationTarget) -> CaseScores:
    """samples (S, *grid) probabilities or masks of one target (S = 1 for deterministic
    methods such as copy-last: its mean forecast is its only sample)."""
    samples = np.asarray(samples)
    if samples.ndim != target.mask.ndim + 1:
        raise SegmentationMetricError(f"samples {samples.shape} should be (S, *{target.mask.shape})")
    per = [mask_metrics(m, target) for m in sample_masks(samples)]
    return CaseScores(mask_metrics(mean_forecast(samples), target), {k: np.array([p[k] for p in per]) for k in METRICS})


@dataclass
class SegmentationSummary:
    """One Table-1 row. `mean_forecast` is the point estimate (mean over targets of the
    mean forecast's metric, undefined targets left out), `ci` its patient bootstrap CI,
    `per_seed` the per-sample metric averaged over targets, mean ± std over seeds."""

    method: str
    mean_forecast: dict[str, float]
    per_seed: dict[str, MeanStd]
    ci: dict[str, Interval | None]
    per_case: dict[str, np.ndarray]  # (n,) mean-forecast metric per target, NaN where undefined
    n_defined: dict[str, int] = field(default_factory=dict)


def summarise(
    method: str, cases: Sequence[CaseScores], patients: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> SegmentationSummary:
    """Aggregate one method's per-target scores (one patient pseudonym per target). A
    metric undefined on every target gets NaN and no CI."""
    if len(cases) != len(patients) or not cases:
        raise SegmentationMetricError(f"{len(cases)} scored targets for {len(patients)} patient ids")
    n_samples = {len(c.per_sample["dice"]) for c in cases}
    if len(n_samples) != 1:
        raise SegmentationMetricError(
            f"targets have different sample counts {sorted(n_samples)}; seeds cannot be paired"
        )
    per_case = {k: np.array([c.mean_forecast[k] for c in cases], np.float64) for k in METRICS}
    seeds = [
        {k: _nanmean(np.array([c.per_sample[k][s] for c in cases])) for k in METRICS} for s in range(n_samples.pop())
    ]
    defined = {k: int((~np.isnan(v)).sum()) for k, v in per_case.items()}
    ci = {
        k: patient_bootstrap(patients, mean_of_cases(v), n_boot, seed) if defined[k] else None
        for k, v in per_case.items()
    }
    point = {k: _nanmean(v) for k, v in per_case.items()}
    return SegmentationSummary(method, point, over_seeds(seeds), ci, per_case, defined)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


@dataclass(frozen=True)
class MetricDifference:
    """Mean-forecast metric of a minus b over the targets both define, with a paired
    patient-bootstrap CI (both rows on the same resamples)."""

    a: str
    b: str
    metric: str
    mean: float
    interval: Interval


def paired_difference(
    a: SegmentationSummary,
    b: SegmentationSummary,
    metric: str,
    patients: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> MetricDifference:
    """a - b on `metric`, per target first (targets undefined for either are left out),
    so the CI describes the same cases as the difference."""
    va, vb = a.per_case[metric], b.per_case[metric]
    if va.shape != vb.shape or len(va) != len(patients):
        raise SegmentationMetricError(f"{a.method} and {b.method} were scored on different targets")
    both = ~(np.isnan(va) | np.isnan(vb))
    va, vb = np.where(both, va, np.nan), np.where(both, vb, np.nan)
    interval = paired_bootstrap(patients, mean_of_cases(va), mean_of_cases(vb), n_boot, seed)
    return MetricDifference(a.method, b.method, metric, _nanmean(va - vb), interval)
