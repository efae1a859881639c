"""CLDM Table-1 segmentation metrics (evaluation.segmentation_metrics): identities, MONAI
agreement, the aVD formula, progression Dice's copy-last property, empty-mask values and
the patient bootstrap on top."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cohortcast.errors import CohortcastError
from cohortcast.evaluation.segmentation_metrics import (
    SegmentationMetricError,
    SegmentationTarget,
    avd,
    dice,
    grid_spacing_mm,
    hd95,
    mask_metrics,
    mean_forecast,
    paired_difference,
    progression_dice,
    score_case,
    summarise,
    volume_ml,
)


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_dice_identities_and_the_empty_case():
    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8)) > 0.6
    assert dice(x, x) == 1.0
    assert dice(_box((4, 4, 4), (0, 0, 0), (2, 4, 4)), _box((4, 4, 4), (2, 0, 0), (4, 4, 4))) == 0.0
    empty = np.zeros((4, 4, 4), bool)
    assert dice(empty, empty) == 1.0  # "none forecast, none found" is right (MONAI ignore_empty=False)
    assert np.isnan(dice(empty, empty, empty=None))
    assert dice(empty, x[:4, :4, :4]) == 0.0
    # 2 * 2 / (4 + 2): hand-computed on a 1-d pair
    assert dice(np.array([1, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 0])) == pytest.approx(4 / 6)


@settings(max_examples=40, deadline=None)
@given(
    pred=arrays(bool, (3, 5, 4), elements=st.booleans()),
    true=arrays(bool, (3, 5, 4), elements=st.booleans()),
)
def test_dice_equals_monais_dice_metric(pred, true):
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    theirs = metric(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(true)[None, None].float())
    assert dice(pred, true) == pytest.approx(float(theirs[0, 0]), abs=1e-6)


def test_avd_formula_on_hand_computed_volumes():
    # 30 predicted, 20 true voxels in a 200-voxel lung: |30 - 20| / 200
    assert avd(30, 20, 200) == pytest.approx(0.05)
    assert avd(20, 30, 200) == pytest.approx(0.05)  # absolute difference
    spacing = (2.5, 0.8, 0.5)  # 1 mm^3 voxels
    pred, true = _box((8, 8, 8), (0, 0, 0), (2, 3, 5)), _box((8, 8, 8), (0, 0, 0), (2, 2, 5))
    assert volume_ml(pred, spacing) == pytest.approx(30 / 1000) and volume_ml(true, spacing) == pytest.approx(0.02)
    # ml from the same grid give the same ratio as voxel counts: the voxel volume cancels
    assert avd(volume_ml(pred, spacing), volume_ml(true, spacing), 200 / 1000) == pytest.approx(0.05)
    target = SegmentationTarget("p", true, np.zeros_like(true), lung_voxels=200, spacing_mm=spacing)
    assert mask_metrics(pred, target)["avd"] == pytest.approx(0.05)
    with pytest.raises(SegmentationMetricError, match="lung volume 0 is not positive"):
        avd(1, 2, 0)
    assert issubclass(SegmentationMetricError, CohortcastError)


def test_progression_dice_copy_last_scores_zero_and_the_truth_one():
    prior = _box((6, 6, 6), (0, 0, 0), (3, 6, 6))
    true = prior | _box((6, 6, 6), (3, 0, 0), (4, 6, 6))  # a new slab became diseased
    assert progression_dice(prior, true, prior) == 0.0  # copy-last: nothing new by construction
    assert progression_dice(true, true, prior) == 1.0
    half = prior | _box((6, 6, 6), (3, 0, 0), (4, 3, 6))
    assert progression_dice(half, true, prior) == pytest.approx(2 * 18 / (18 + 36))
    assert np.isnan(progression_dice(prior, prior, prior))  # stable patient: nothing to score
    assert progression_dice(true, prior, prior) == 0.0  # invented progression


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation noise
def test_hd95_equals_monai_with_anisotropic_spacing_and_a_hand_value():
    from monai.metrics import compute_hausdorff_distance

    spacing = (2.5, 0.7, 0.9)
    a, b = _box((10, 12, 12), (2, 2, 2), (6, 8, 9)), _box((10, 12, 12), (3, 4, 1), (8, 9, 7))
    theirs = compute_hausdorff_distance(
        torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], True, percentile=95, spacing=list(spacing)
    )
    assert hd95(a, b, spacing) == pytest.approx(float(theirs[0, 0]))
    assert hd95(a, a, spacing) == 0.0
    # single voxels 3 slices apart: 3 x 2.5 mm
    one, other = _box((10, 4, 4), (1, 1, 1), (2, 2, 2)), _box((10, 4, 4), (4, 1, 1), (5, 2, 2))
    assert hd95(one, other, spacing) == pytest.approx(7.5)
    empty = np.zeros((10, 4, 4), bool)
    assert hd95(empty, empty, spacing) == 0.0
    diagonal = float(np.linalg.norm([25.0, 2.8, 3.6]))  # the grid's extent in mm
    assert hd95(one, empty, spacing) == pytest.approx(diagonal) and hd95(empty, one, spacing) == pytest.approx(diagonal)


def test_spacing_from_the_ingested_affine_is_in_array_axis_order():
    affine = np.diag([0.7, 0.8, 2.5, 1.0])  # columns (i, j, k) = (X, Y, Z)
    assert grid_spacing_mm(affine.reshape(-1)) == pytest.approx((2.5, 0.8, 0.7))


def test_bad_masks_are_refused_clearly():
    with pytest.raises(SegmentationMetricError, match="different grids"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(SegmentationMetricError, match="threshold probabilities first"):
        dice(np.full((2, 2), 0.3), np.zeros((2, 2)))


def test_mean_forecast_thresholds_the_mean_probability():
    samples = np.array([[0.2, 0.0, 1.0], [0.9, 0.4, 0.0], [0.6, 0.4, 0.0]])
    assert mean_forecast(samples).tolist() == [True, False, False]  # 0.57, 0.27, 0.33


def _cohort(n_targets=12, samples=4, seed=0):
    """Targets with some progression; a noisy sampler around the truth."""
    rng = np.random.default_rng(seed)
    targets, forecasts = [], []
    for i in range(n_targets):
        prior = _box((4, 6, 6), (0, 0, 0), (2, 6, int(rng.integers(1, 6))))
        true = prior | (rng.random((4, 6, 6)) > 0.85)
        targets.append(SegmentationTarget(f"p{i // 2}", true, prior, lung_voxels=144, spacing_mm=(2.0, 1.0, 1.0)))
        noise = rng.random((samples, 4, 6, 6)) > 0.9
        forecasts.append(np.where(noise, 1.0 - true, true.astype(float)) * 0.8 + 0.1)
    return targets, forecasts


def test_summary_seeds_bootstrap_and_paired_differences():
    targets, forecasts = _cohort()
    patients = [t.patient for t in targets]
    model = summarise("model", [score_case(f, t) for f, t in zip(forecasts, targets)], patients, n_boot=200)
    copy = summarise("copy-last", [score_case(t.last_prior[None], t) for t in targets], patients, n_boot=200)
    for metric in ("dice", "avd", "progression_dice", "hd95"):
        ci = model.ci[metric]
        assert ci.low <= model.mean_forecast[metric] <= ci.high, metric
        assert model.per_seed[metric].n == 4
    assert copy.per_seed["dice"].std == 0.0 and copy.per_seed["dice"].n == 1  # one deterministic sample
    assert copy.mean_forecast["progression_dice"] == 0.0
    assert copy.n_defined["progression_dice"] == sum(bool((t.mask & ~t.last_prior).any()) for t in targets)
    same = paired_difference(model, model, "avd", patients, n_boot=200)
    assert (same.mean, same.interval.low, same.interval.high) == (0.0, 0.0, 0.0)
    better = paired_difference(model, copy, "progression_dice", patients, n_boot=200)
    assert better.interval.low > 0  # the sampler sees the progression copy-last cannot


def test_summary_refuses_mismatched_inputs():
    targets, forecasts = _cohort(n_targets=2)
    cases = [score_case(forecasts[0], targets[0]), score_case(forecasts[1][:2], targets[1])]
    with pytest.raises(SegmentationMetricError, match="different sample counts"):
        summarise("m", cases, ["a", "b"])
    with pytest.raises(SegmentationMetricError, match="2 scored targets for 1 patient ids"):
        summarise("m", cases, ["a"])
