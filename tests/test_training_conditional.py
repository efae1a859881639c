"""Stage d pieces without Ray: trajectories, per-epoch target sampling, the objective."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from cohortcast.config.models import ConditionerConfig, ForecasterConfig
from cohortcast.data.manifest import EHR_FEATURES
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.tiny_llm import write_tiny_gemma3
from cohortcast.training.ldm_conditional_stage import ConditionalObjective, predicted_clean_latent
from cohortcast.training.trajectories import make_trajectory, sample_targets

MAX_EXAMS = 3


def nodule_group(days, malignant=1):
    """Cache rows of one nodule, deliberately out of date order; latent k is filled with days."""
    n = len(days)
    group = {"patient": np.array(["sub-a"] * n, object), "nodule_id": np.array(["n1"] * n, object),
             "days_since_baseline": np.array(days), "malignant": np.array([malignant] * n),
             "latent": np.stack([np.full((4, 4, 4), d, np.float32) for d in days]),
             "crop": np.stack([np.full((32, 32), d / 1000, np.float32) for d in days])}
    for k in EHR_FEATURES:
        group[k] = np.array([None] * n, object)
    group["SCT_LONG_DIA"] = np.array([float(d) / 100 + 5 for d in days])  # text differs per exam
    return group


def test_trajectory_sorts_pads_and_keeps_the_latest_exams():
    row = make_trajectory(nodule_group([730, 0, 365, 1100, 1500]), MAX_EXAMS)
    assert row["num_exams"][0] == 4  # max_exams priors + 1 target: the oldest exam dropped
    np.testing.assert_array_equal(row["days"][0], [365, 730, 1100, 1500])
    np.testing.assert_array_equal(row["latents"][0][:, 0, 0, 0], [365, 730, 1100, 1500])
    short = make_trajectory(nodule_group([365, 0]), MAX_EXAMS)
    assert short["num_exams"][0] == 2 and short["latents"].shape == (1, MAX_EXAMS + 1, 4, 4, 4)
    np.testing.assert_array_equal(short["latents"][0][2:], 0)  # padding
    texts = json.loads(short["ehr_texts_json"][0])
    assert len(texts) == 2 and "5.0 mm" in texts[0] and "8.7 mm" in texts[1]


def _batch(rows):
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_sampled_targets_are_follow_ups_with_only_earlier_priors():
    batch = _batch([make_trajectory(nodule_group([0, 365, 730, 1100]), MAX_EXAMS),
                    make_trajectory(nodule_group([0, 400]), MAX_EXAMS)])
    seen = set()
    for epoch in range(30):
        ex = sample_targets(batch, np.random.default_rng([23, epoch, 0]))
        target_day = ex["target"][:, 0, 0, 0]
        for i in range(2):
            priors = ex["prior_latents"][i, :, 0, 0, 0][ex["exam_mask"][i]]
            assert len(priors) >= 1 and (priors < target_day[i]).all()
            assert ex["baseline"][i, 0, 0, 0] == priors.max()  # the latest prior
            assert ex["horizon_days"][i] == target_day[i] - priors.max()
            np.testing.assert_allclose(ex["days_before_target"][i][ex["exam_mask"][i]], target_day[i] - priors)
            assert (ex["days_before_target"][i][~ex["exam_mask"][i]] == 0).all()
        assert ex["target"][1, 0, 0, 0] == 400  # one follow-up: always the target
        assert "8.7 mm" not in ex["ehr_text"][1]  # text of the latest prior, not of the target
        seen.add(float(target_day[0]))
    assert seen == {365.0, 730.0, 1100.0}  # every follow-up gets drawn across epochs


def test_predicted_clean_latent_matches_diffusers():
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    noisy, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([5, 500, 990])
    ours = predicted_clean_latent(scheduler.alphas_cumprod, noisy, eps, t)
    for i in range(3):
        ref = scheduler.step(eps[i:i + 1], int(t[i]), noisy[i:i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i:i + 1], ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    path = write_tiny_gemma3(tmp_path_factory.mktemp("llm") / "gemma", ["solid nodule right upper lobe mm"])
    torch.manual_seed(0)
    f = Forecaster(ForecasterConfig(conditioner=ConditionerConfig(llm_path=str(path), num_soft_prompts=2)))
    f.vae.requires_grad_(False)
    return f


def _examples(labels):
    batch = _batch([make_trajectory(nodule_group([0, 365, 700], m), MAX_EXAMS) for m in labels])
    return sample_targets(batch, np.random.default_rng(0))


@pytest.mark.parametrize("task_loss", ["probe_bce", "decoded_l1"])
def test_objective_trains_conditioning_parts_not_the_vae(forecaster, task_loss):
    objective = ConditionalObjective(forecaster, task_loss, task_weight=1.0)
    forecaster.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    terms = objective(_examples([1, 0]))
    assert set(terms) == {"diffusion", "task", "total"}
    torch.testing.assert_close(terms["total"], terms["diffusion"] + terms["task"])
    terms["total"].backward()
    for name in ("denoiser.unet.conv_in.weight", "denoiser.ehr_proj.weight", "temporal.latent_proj.weight",
                 "conditioner.soft_prompts"):
        grad = dict(forecaster.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in forecaster.vae.parameters())


def test_task_weight_and_missing_labels(forecaster):
    torch.manual_seed(1)
    off = ConditionalObjective(forecaster, "probe_bce", task_weight=0.0)(_examples([1, 0]))
    torch.testing.assert_close(off["total"], off["diffusion"])
    torch.manual_seed(1)
    unlabelled = ConditionalObjective(forecaster, "probe_bce", task_weight=1.0)(_examples([-1, -1]))
    assert float(unlabelled["task"]) == 0.0
    torch.manual_seed(1)
    none = ConditionalObjective(forecaster, "none")(_examples([1, 0]))
    assert "task" not in none
