"""CLDM part 2's diffusion/regressor stage pieces without Ray: trajectory examples (fresh
targets, priors strictly before the target, random truncation), the per-step batches of
both kinds, the task loss against MONAI's DiceCELoss, frozen decoders, the regressor's
unweighted task loss, target scales, and mask anchoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.losses import DiceCELoss

from cohortcast.config.cldm_models import (
    CLDMModelsConfig,
    SegmentationDecoderConfig,
    TokenDenoiserConfig,
    TokenLatentConfig,
)
from cohortcast.config.models import SchedulerConfig, TemporalConfig
from cohortcast.models.cldm_forecaster import CLDMForecaster
from cohortcast.models.mask_anchoring import anchored_mask, anchored_volume
from cohortcast.models.segmentation_decoder import SegmentationDecoder
from cohortcast.models.study_regressor import StudyRegressor
from cohortcast.training.cldm_diffusion_stage import (
    CLDMObjective,
    fit_target_scales,
    mask_avd,
    per_row_dice_bce,
    training_batches,
    validation_cases,
)
from cohortcast.training.study_trajectories import StudyTrajectories, draw_examples, examples_for, prior_tokens

DIM = 16


def tiny_models(dims=(2, 3)) -> CLDMModelsConfig:
    cfg = CLDMModelsConfig(
        latent=TokenLatentConfig(dim=DIM, grid_2d=(4, 4), grid_3d=(2, 4, 4), patch_3d=(2, 2, 2), dims=dims),
        temporal=TemporalConfig(d_model=32, date_dim=16, num_layers=1, num_heads=4, max_exams=4),
        denoiser=TokenDenoiserConfig(width=32, depth=1, heads=4, group_3d=(1, 2, 2)),
        scheduler=SchedulerConfig(micro_batch=4, num_samples=2),
        segmentation=SegmentationDecoderConfig(channels=(8,)),
        prior_summary="pooled",
    )
    cfg.validate()
    return cfg


def cohort(dims: int, exams: list[int], seed: int = 0) -> StudyTrajectories:
    """Patients with the given exam counts; each study's tokens hold its row index in
    channel 0 so a test can tell which study went where."""
    rng = np.random.default_rng(seed)
    n = 16 if dims == 2 else 32
    rows = sum(exams)
    tokens = rng.normal(size=(rows, 1 + n, DIM)).astype(np.float32) * 0.1
    tokens[:, :, 0] = np.arange(rows)[:, None]
    days = np.concatenate([np.cumsum(rng.integers(100, 400, size=k)).astype(np.float32) for k in exams])
    masks = (rng.random((rows, 4, 8, 8)) < 0.2).astype(np.uint8) if dims == 3 else None
    return StudyTrajectories(
        dims=dims,
        patients=[f"p{i}" for i in range(len(exams))],
        offsets=np.concatenate([[0], np.cumsum(exams)]).astype(np.int64),
        studies=[f"s{r}" for r in range(rows)],
        days=days,
        tokens=tokens,
        has_mask=np.ones(rows, bool),
        lung_voxels=np.full(rows, 200, np.int64),
        reports=[f"report {r}" for r in range(rows)],
        masks=masks,
    )


def test_examples_take_only_earlier_exams_and_truncate_to_the_most_recent():
    traj = cohort(3, [5, 3, 4])
    rng = np.random.default_rng(1)
    seen_targets, kept = set(), set()
    for _ in range(50):
        ex = draw_examples(traj, np.arange(3), rng, max_priors=4, truncate=True)
        priors = prior_tokens(traj, ex)
        for b in range(3):
            rows = traj.rows_of(int(ex.trajectory[b]))
            target = int(ex.target_row[b])
            assert target in rows[1:]  # a follow-up, never the first exam
            real = ex.prior_rows[b][ex.exam_mask[b]]
            # the k most recent exams before the target, oldest first
            assert list(real) == list(range(target - len(real), target))
            assert np.all(ex.days_before_target[b][ex.exam_mask[b]] > 0)
            assert np.all(priors[b][~ex.exam_mask[b]] == 0)
            assert ex.last_prior_row[b] == target - 1
            seen_targets.add(target)
            kept.add(len(real))
    assert kept == {1, 2, 3, 4}  # 1, a few and all priors all occur
    assert len(seen_targets) == 12 - 3  # every follow-up is drawn at some point


def test_examples_for_caps_priors_at_the_model_slots():
    traj = cohort(3, [7])
    ex = examples_for(traj, [(0, 6)], max_priors=4)
    assert list(ex.prior_rows[0]) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="no prior"):
        examples_for(traj, [(0, 0)], max_priors=4)


def test_a_step_has_both_kinds_and_an_epoch_follows_the_ct_stream():
    shards = {3: cohort(3, [3, 4, 2, 5]), 2: cohort(2, [2, 3, 2], seed=2)}
    steps = list(training_batches(shards, {3: 2, 2: 2}, np.random.default_rng(0), 4, truncate=False))
    assert len(steps) == 2  # 4 CT trajectories / 2 per step; the 3 radiograph ones restart
    for batch in steps:
        assert batch["priors_3d"].shape == (2, 4, 33, DIM) and batch["target_mask_3d"].shape == (2, 4, 8, 8)
        assert batch["priors_2d"].shape == (2, 4, 17, DIM) and len(batch["reports_2d"]) == 2
        # the radiographs' report is the target's and the prior handed along is its previous exam
        for report, last in zip(batch["reports_2d"], batch["last_prior_2d"][:, 0, 0]):
            assert report == f"report {int(last) + 1}"
    ct_targets = {int(v) for batch in steps for v in batch["target_3d"][:, 0, 0]}
    assert len(ct_targets) == 4  # each CT trajectory exactly once per epoch
    assert not list(training_batches({3: None, 2: None}, {3: 2, 2: 2}, np.random.default_rng(0), 4, False))


def test_the_task_loss_is_monais_dice_ce_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 4, 8, 8)
    mask = (torch.rand(3, 4, 8, 8) < 0.3).float()
    reference = DiceCELoss(sigmoid=True)
    per_row = per_row_dice_bce(logits, mask)
    for i in range(3):
        torch.testing.assert_close(per_row[i], reference(logits[i : i + 1], mask[i : i + 1, None]), atol=1e-5, rtol=0)


def _batch(cfg):
    traj = cohort(3, [3, 4, 3, 5])
    fit_target_scales(cfg, {3: traj})
    return next(iter(training_batches({3: traj}, {3: 4}, np.random.default_rng(0), 4, True)))


@pytest.mark.parametrize("kind", [CLDMForecaster, StudyRegressor])
def test_the_task_loss_trains_the_forecaster_and_leaves_the_decoder_frozen(kind):
    cfg = tiny_models(dims=(3,))
    batch = _batch(cfg)
    torch.manual_seed(0)
    forecaster, seg = kind(cfg), SegmentationDecoder(cfg, 3)
    objective = CLDMObjective(forecaster, seg, None, task_weight=1.0, task_weighting="alpha_bar")
    objective.train()
    assert not seg.training  # frozen decoders stay in eval mode
    terms = objective(batch)
    assert set(terms) == {"diffusion_3d", "task_3d", "total"}
    torch.testing.assert_close(terms["total"], terms["diffusion_3d"] + terms["task_3d"])
    terms["total"].backward()
    assert all(p.grad is None for p in seg.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in forecaster.denoiser.parameters())
    if kind is StudyRegressor:
        # one pass at the last timestep: its task loss is unweighted (a_999 would erase it)
        assert objective._weights(torch.tensor([999])).item() == 1.0
    without = CLDMObjective(forecaster, seg, None, task_weight=0.0)(batch)
    assert "task_3d" not in without


def test_target_scales_are_one_over_the_change_spread():
    cfg = tiny_models(dims=(3,))
    traj = cohort(3, [3, 4])
    fit_target_scales(cfg, {3: traj})
    pairs = [(r, r + 1) for i in range(2) for r in traj.rows_of(i)[:-1]]
    change = np.stack([traj.tokens[b] - traj.tokens[a] for a, b in pairs])
    assert cfg.denoiser.target_scale_3d == pytest.approx(1.0 / change.std(ddof=1), rel=1e-4)


def test_validation_cases_are_each_trajectorys_last_exam_with_a_mask():
    traj = cohort(3, [3, 1, 4])
    traj.has_mask[traj.offsets[3] - 1] = False  # the third patient's last exam has no mask
    ex = validation_cases(traj, 4, limit=10)
    assert list(ex.target_row) == [2]
    assert mask_avd(np.ones((1, 10)), np.zeros((1, 10)), np.array([40])) == pytest.approx(0.25)


def test_anchoring_is_copy_last_when_the_forecast_decodes_like_the_prior():
    rng = np.random.default_rng(0)
    prior = (rng.random((4, 6, 6)) < 0.3).astype(np.uint8)
    p = rng.random((4, 6, 6))
    assert np.array_equal(anchored_mask(p, p, prior), prior)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift=st.floats(-0.4, 0.4),
    fraction=st.floats(0.0, 1.0),
)
def test_anchored_masks_grow_or_shrink_the_prior_to_the_anchored_volume(seed, shift, fraction):
    rng = np.random.default_rng(seed)
    prior = (rng.random((3, 5, 5)) < fraction).astype(np.uint8)
    p_prior = rng.random((3, 5, 5))
    p_forecast = np.clip(p_prior + shift * rng.random((3, 5, 5)), 0, 1)
    mask = anchored_mask(p_forecast, p_prior, prior)
    volume = anchored_volume(p_forecast, p_prior, prior)
    assert mask.sum() == min(int(round(volume)), prior.size)
    if volume >= prior.sum():
        assert np.all(mask >= prior)  # growth keeps every prior voxel
    else:
        assert np.all(mask <= prior)  # shrinkage adds none


def test_anchoring_refuses_masks_of_another_grid():
    with pytest.raises(ValueError, match="shapes differ"):
        anchored_mask(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 3)))
