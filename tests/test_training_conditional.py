"""Stage d pieces without Ray: trajectories, per-epoch target sampling, the objective."""

import json

import numpy as np
import pytest
import torch

from conftest import forecaster_config

from cohortcast.config.models import ConditionerConfig, SchedulerConfig
from cohortcast.data.manifest import EHR_FEATURES
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.tiny_llm import write_tiny_gemma3
from cohortcast.training.ldm_conditional_stage import ConditionalObjective
from cohortcast.training.trajectories import make_trajectory, sample_targets

MAX_EXAMS = 3


def nodule_group(days, malignant=1):
    """Cache rows of one nodule, deliberately out of date order; latent k is filled with days
    (a cache without `latent_d8`: one orientation)."""
    n = len(days)
    group = {
        "patient": np.array(["sub-a"] * n, object),
        "nodule_id": np.array(["n1"] * n, object),
        "days_since_baseline": np.array(days),
        "malignant": np.array([malignant] * n),
        "latent": np.stack([np.full((4, 8, 8), d, np.float32) for d in days]),
        "crop": np.stack([np.full((32, 32), d / 1000, np.float32) for d in days]),
    }
    for k in EHR_FEATURES:
        group[k] = np.array([None] * n, object)
    group["SCT_LONG_DIA"] = np.array([float(d) / 100 + 5 for d in days])  # the record differs per exam
    return group


def test_trajectory_sorts_pads_and_keeps_the_latest_exams():
    row = make_trajectory(nodule_group([730, 0, 365, 1100, 1500]), MAX_EXAMS)
    assert row["num_exams"][0] == 4  # max_exams priors + 1 target: the oldest exam dropped
    np.testing.assert_array_equal(row["days"][0], [365, 730, 1100, 1500])
    # latents: (slots, V, c, h, w), V = 1 orientation for a cache with only `latent`
    np.testing.assert_array_equal(row["latents"][0][:, 0, 0, 0, 0], [365, 730, 1100, 1500])
    short = make_trajectory(nodule_group([365, 0]), MAX_EXAMS)
    assert short["num_exams"][0] == 2 and short["latents"].shape == (1, MAX_EXAMS + 1, 1, 4, 8, 8)
    np.testing.assert_array_equal(short["latents"][0][2:], 0)  # padding
    records = json.loads(short["ehr_json"][0])  # EHR records (manifest names), one per exam, in date order
    assert len(records) == 2 and set(records[0]) == set(EHR_FEATURES)
    assert records[0]["SCT_LONG_DIA"] == 5.0 and records[1]["SCT_LONG_DIA"] == 8.65 and records[0]["age"] is None


def _batch(rows):
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def test_sampled_targets_are_follow_ups_with_only_earlier_priors():
    batch = _batch(
        [
            make_trajectory(nodule_group([0, 365, 730, 1100]), MAX_EXAMS),
            make_trajectory(nodule_group([0, 400]), MAX_EXAMS),
        ]
    )
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
        for i in range(2):  # the record of the latest prior (the baseline), not of the target
            assert ex["ehr"][i]["SCT_LONG_DIA"] == pytest.approx(float(ex["baseline"][i, 0, 0, 0]) / 100 + 5)
        seen.add(float(target_day[0]))
    assert seen == {365.0, 730.0, 1100.0}  # every follow-up gets drawn across epochs


# predicted_clean_latent (epsilon only) became models.schedulers.predicted_clean: its
# diffusers check, for every prediction type, is in test_models_schedulers.py.


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    path = write_tiny_gemma3(tmp_path_factory.mktemp("llm") / "gemma", ["solid nodule right upper lobe mm"])
    torch.manual_seed(0)
    f = Forecaster(forecaster_config(conditioner=ConditionerConfig(llm_path=str(path), num_soft_prompts=2)))
    f.vae.requires_grad_(False)
    return f


def _examples(labels):
    batch = _batch([make_trajectory(nodule_group([0, 365, 700], m), MAX_EXAMS) for m in labels])
    return sample_targets(batch, np.random.default_rng(0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("task_loss", ["probe_bce", "decoded_l1"])
def test_objective_trains_conditioning_parts_not_the_vae(forecaster, task_loss, prediction_type, monkeypatch):
    monkeypatch.setattr(forecaster.cfg.scheduler, "prediction_type", prediction_type)
    objective = ConditionalObjective(forecaster, task_loss, task_weight=1.0)
    assert objective.scheduler.config.prediction_type == prediction_type
    forecaster.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    terms = objective(_examples([1, 0]))
    assert set(terms) == {"diffusion", "task", "total"}
    torch.testing.assert_close(terms["total"], terms["diffusion"] + terms["task"])
    terms["total"].backward()
    for name in (
        "denoiser.unet.conv_in.weight",
        "denoiser.ehr_proj.weight",
        "temporal.latent_proj.weight",
        "conditioner.soft_prompts",
    ):
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


class FakeTrajectories:
    """What pipeline.namd.change_scale reads of a Ray dataset: numpy batches of
    trajectory rows (here 2 rows a batch, whatever batch_size is asked)."""

    def __init__(self, latents: np.ndarray, num_exams: np.ndarray):
        self.latents, self.num_exams = latents, num_exams

    def iter_batches(self, batch_size: int, batch_format: str):
        assert batch_format == "numpy" and batch_size >= 1
        for start in range(0, len(self.latents), 2):
            yield {"latents": self.latents[start : start + 2], "num_exams": self.num_exams[start : start + 2]}


def test_change_scale_is_one_over_the_std_of_consecutive_changes():
    """Guards pipeline.namd.change_scale: 1 / std of follow-up - previous exam latents over
    every trajectory and orientation, padding slots ignored (they hold garbage here)."""
    from cohortcast.pipeline.namd import change_scale

    rng = np.random.default_rng(0)
    num_exams = np.array([2, 4, 3, 2, 4])
    latents = rng.normal(size=(5, 4, 8, 4, 2, 2)) * 3.0 + np.arange(4)[None, :, None, None, None, None]
    changes = []
    for row, n in zip(latents, num_exams):
        row[n:] = 1e6  # padding: must not count
        changes.append((row[1:n] - row[: n - 1]).ravel())
    expected = 1.0 / np.concatenate(changes).std()
    got = change_scale(FakeTrajectories(latents.astype(np.float32), num_exams))
    assert got == pytest.approx(expected, rel=1e-5)
    assert 0.1 < got < 0.5  # changes of two N(., 9) latents: std ~4.2
    with pytest.raises(ValueError, match="no trajectory with a follow-up"):
        change_scale(FakeTrajectories(latents[:2].astype(np.float32), np.array([1, 1])))


def test_objective_diffuses_the_scaled_change(forecaster, monkeypatch):
    """Guards the change target in the stage-d objective: with the context fixed (no
    condition dropout) and prediction "sample" at t = 0, where the noisy input is the
    clean generated quantity itself, the diffusion term is the MSE of the network output
    against (follow-up - baseline) * change_scale, not against the follow-up latent."""
    monkeypatch.setattr(forecaster.cfg.denoiser, "condition_dropout", 0.0)
    monkeypatch.setattr(forecaster.cfg.denoiser, "change_scale", 3.0)
    monkeypatch.setattr(forecaster.cfg.scheduler, "prediction_type", "sample")
    monkeypatch.setattr(forecaster.cfg.scheduler, "num_train_timesteps", 1)  # t is always 0
    objective = ConditionalObjective(forecaster, "none")
    batch = _examples([1, 0])
    torch.manual_seed(0)
    terms = objective(batch)
    torch.manual_seed(0)
    torch.rand(2)  # the objective's condition-dropout draw comes first
    noise = torch.randn_like(batch["target"])  # then its noise
    with torch.no_grad():
        clean = (batch["target"] - batch["baseline"]) * 3.0
        noisy = objective.scheduler.add_noise(clean, noise, torch.zeros(2, dtype=torch.long))
        out = forecaster.denoiser(
            noisy, torch.zeros(2, dtype=torch.long), batch["baseline"], objective.context(batch, None)
        )
    torch.testing.assert_close(terms["diffusion"], torch.nn.functional.mse_loss(out, clean), rtol=1e-4, atol=1e-6)


def test_regression_objective_trains_the_denoiser_in_one_pass():
    """Guards ForecasterConfig.kind "regression" in the stage-d objective: a finite loss
    (MSE of one pass from a zero input at the last timestep against the scaled change)
    whose gradient reaches the denoiser and the temporal encoder."""
    torch.manual_seed(0)
    f = Forecaster(forecaster_config(kind="regression", scheduler=SchedulerConfig(micro_batch=4)))
    f.vae.requires_grad_(False)
    f.cfg.denoiser.condition_dropout = 0.0
    objective = ConditionalObjective(f, "decoded_l1", task_weight=0.5)
    batch = _examples([1, 0])
    terms = objective(batch)
    assert all(torch.isfinite(v) for v in terms.values())
    with torch.no_grad():
        predicted = f.regress(batch["baseline"], objective.context(batch, None))
    torch.testing.assert_close(
        terms["diffusion"],
        torch.nn.functional.mse_loss(predicted, f.to_generated(batch["target"], batch["baseline"])),
        rtol=1e-5,
        atol=1e-6,
    )
    terms["total"].backward()
    for name in ("denoiser.unet.conv_in.weight", "denoiser.unet.conv_out.weight", "temporal.latent_proj.weight"):
        grad = dict(f.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in f.vae.parameters())


def test_probe_loss_only_scores_rows_in_the_orientation_the_probe_was_trained_on(forecaster):
    """The VAE probe saw crops as ingested only: rotated rows (augmentation) get no probe BCE."""
    examples = _examples([1, 0])
    examples["orientation"] = torch.tensor([3, 5])
    torch.manual_seed(1)
    assert float(ConditionalObjective(forecaster, "probe_bce")(examples)["task"].detach()) == 0.0
    examples["orientation"] = torch.tensor([0, 0])
    torch.manual_seed(1)
    assert float(ConditionalObjective(forecaster, "probe_bce")(examples)["task"].detach()) > 0.0
