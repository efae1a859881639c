"""CLDMBundle: the CLDM training output as one forecaster (what serving and the CLDM
cohort job call)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cldm_fixtures import IMAGE, VOLUME, random_priors, write_tiny_bundle

from cohortcast.models.cldm_bundle import CLDMBundle
from cohortcast.models.errors import ForecasterLoadError
from cohortcast.models.mask_anchoring import anchored_mask


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CLDMBundle:
    return CLDMBundle.load(write_tiny_bundle(tmp_path_factory.mktemp("cldm") / "train"))


def test_loads_every_part_and_describes_itself_without_paths(bundle):
    info = bundle.info()
    assert info["name"] == "train" and "/" not in info["name"]
    assert info["kinds"] == ["ct", "radiograph"]
    assert info["image_shapes"] == {"ct": list(VOLUME), "radiograph": list(IMAGE)}
    assert info["segmentation"] and info["report"] and info["regressor"]
    assert info["max_priors"] == 6


def test_ct_forecast_has_mask_volume_and_sample_spread(bundle):
    priors = random_priors("ct", cases=2, k=3)
    out = bundle.forecast(priors, ["a", "b"], num_samples=3, seed=7, steps=3, voxel_ml=0.5)
    assert len(out) == 2
    for case in out:
        assert case.probability.shape == VOLUME and case.mask.shape == VOLUME
        assert 0.0 <= case.probability.min() and case.probability.max() <= 1.0
        assert case.probability_variance.min() >= 0 and case.probability_variance.max() > 0  # 3 samples differ
        assert case.fibrotic_voxels == int((case.probability >= 0.5).sum())
        assert case.fibrotic_volume_ml == pytest.approx(case.fibrotic_voxels * 0.5)
        assert (
            case.sample_voxels.shape == (3,) and case.sample_volume_ml.tolist() == (case.sample_voxels * 0.5).tolist()
        )
        assert case.report is None  # reports are of radiographs
        assert case.anchored_mask is None


def test_a_case_is_bit_identical_alone_or_in_any_batch(bundle):
    batch = random_priors("ct", cases=3, k=4, seed=1)
    batch[1] = batch[1][:2]  # ragged prior counts
    together = bundle.forecast(batch, ["x", "y", "z"], num_samples=2, seed=3, steps=3)
    alone = bundle.forecast([batch[1]], ["y"], num_samples=2, seed=3, steps=3)[0]
    assert np.array_equal(together[1].token_mean, alone.token_mean)
    assert np.array_equal(together[1].probability, alone.probability)
    again = bundle.forecast([batch[1]], ["y"], num_samples=2, seed=4, steps=3)[0]
    assert not np.array_equal(again.token_mean, alone.token_mean)  # the seed matters


def test_priors_change_the_forecast(bundle):
    priors = random_priors("ct", cases=1, k=3, seed=2)
    full = bundle.forecast(priors, ["a"], num_samples=1, seed=0, steps=3)[0]
    last_only = bundle.forecast([priors[0][-1:]], ["a"], num_samples=1, seed=0, steps=3)[0]
    assert not np.array_equal(full.token_mean, last_only.token_mean)


def test_anchoring_to_the_last_priors_mask(bundle):
    priors = random_priors("ct", cases=2, k=2, seed=5)
    rng = np.random.default_rng(0)
    known = (rng.random(VOLUME) < 0.2).astype(np.uint8)
    out = bundle.forecast(priors, ["a", "b"], num_samples=2, seed=1, steps=3, voxel_ml=2.0, prior_masks=[known, None])
    last = min(priors[0], key=lambda p: p[1])[0]  # the most recent prior
    prior_tokens = bundle.encode(torch.as_tensor(last)[None])
    with torch.no_grad():
        prior_prob = torch.sigmoid(bundle.segmentation(prior_tokens)[:, 0]).numpy()[0]
    expected = anchored_mask(out[0].probability, prior_prob, known)
    assert np.array_equal(out[0].anchored_mask, expected)
    assert out[0].anchored_volume_ml == pytest.approx(2.0 * expected.sum())
    assert out[1].anchored_mask is None  # no mask given for that case


def test_radiograph_forecast_generates_a_report(bundle):
    out = bundle.forecast(
        random_priors("radiograph", cases=2, k=2), ["a", "b"], num_samples=2, seed=0, steps=2, kind="radiograph"
    )
    assert all(isinstance(c.report, str) for c in out)
    assert all(c.mask is None for c in out)  # the tiny bundle's decoder segments CT


def test_the_regressor_baseline(bundle):
    priors = random_priors("ct", cases=1, k=2)
    reg = bundle.forecast(priors, ["a"], method="regressor", seed=0)[0]
    diff = bundle.forecast(priors, ["a"], num_samples=1, seed=0, steps=3)[0]
    assert reg.probability.shape == VOLUME and not np.array_equal(reg.token_mean, diff.token_mean)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(kind="mri"), "kind 'mri'"),
        (dict(case_ids=["a", "b"]), "2 case ids for 1 cases"),
        (dict(priors=[[]]), "0 priors"),
        (dict(priors=[[(np.zeros((4, 4, 4), np.float32), 10.0)]]), "must be"),
        (dict(prior_masks=[np.zeros((2, 2, 2))]), "prior mask must be"),
        (dict(prior_masks=[None, None]), "2 prior masks for 1 cases"),
        (dict(method="oracle"), "no such model"),
        (dict(voxel_ml=[1.0, 2.0]), "2 values for 1 cases"),
    ],
)
def test_bad_calls_are_refused_with_a_message(bundle, call, message):
    args = dict(priors=random_priors("ct", cases=1, k=2), case_ids=["a"], num_samples=1, steps=2)
    args.update(call)
    with pytest.raises(ValueError, match=message):
        bundle.forecast(**args)


def test_too_many_priors_is_refused(bundle):
    with pytest.raises(ValueError, match="1..temporal.max_exams=6"):
        bundle.forecast(random_priors("ct", cases=1, k=7), ["a"], num_samples=1, steps=2)


def test_a_missing_or_mismatched_part_is_a_load_error(tmp_path):
    with pytest.raises(ForecasterLoadError, match="no diffusion/ folder"):
        (tmp_path / "lone" / "encoder").mkdir(parents=True)
        CLDMBundle.load(tmp_path / "lone")
    folder = write_tiny_bundle(tmp_path / "wide", parts=("segmentation",))
    from cldm_fixtures import tiny_encoder_config

    from cohortcast.models.universal_encoder import UniversalEncoder

    cfg = tiny_encoder_config()
    cfg.volume_3d = (8, 64, 64)  # another grid than the forecaster's tokens
    cfg.validate()
    UniversalEncoder(cfg).save(folder / "encoder")
    with pytest.raises(ForecasterLoadError, match="latent.grid_3d"):
        CLDMBundle.load(folder)
