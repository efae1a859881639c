"""Prediction types (epsilon, v, x0): the training target and the implied clean latent
agree with diffusers, and the default (v-prediction) reaches the DDIM sampler."""

import pytest
import torch
from diffusers import DDPMScheduler

from cohortcast.config.models import SchedulerConfig
from cohortcast.models.schedulers import inference_scheduler, predicted_clean, train_scheduler, training_target

PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_predicted_clean_matches_diffusers(prediction_type):
    """Guards models.schedulers.predicted_clean (which replaced the epsilon-only
    predicted_clean_latent): x0 from a network output equals diffusers' DDPM
    pred_original_sample for every prediction type, per row at mixed timesteps."""
    scheduler = train_scheduler(SchedulerConfig(prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(0)
    noisy, out = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([5, 500, 990])
    ours = predicted_clean(scheduler.alphas_cumprod, noisy, out, t, prediction_type)
    assert ours.dtype == torch.float32
    for i in range(3):
        ref = scheduler.step(out[i : i + 1], int(t[i]), noisy[i : i + 1]).pred_original_sample
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_target_and_predicted_clean_are_consistent(prediction_type):
    """Guards training_target: the target for v is diffusers' get_velocity, epsilon the
    noise, sample the clean latent; and a perfect prediction of it gives back x0."""
    scheduler = train_scheduler(SchedulerConfig(prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 250, 700, 999])
    target = training_target(scheduler, clean, noise, t)
    expected = {"epsilon": noise, "v_prediction": scheduler.get_velocity(clean, noise, t), "sample": clean}
    torch.testing.assert_close(target, expected[prediction_type])
    noisy = scheduler.add_noise(clean, noise, t)
    torch.testing.assert_close(
        predicted_clean(scheduler.alphas_cumprod, noisy, target, t, prediction_type),
        clean,
        rtol=1e-4,
        atol=1e-4 if prediction_type != "epsilon" else 5e-2,
    )


def test_unknown_prediction_type_is_an_error():
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="epsilon")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        predicted_clean(scheduler.alphas_cumprod, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1]), "velocity")


def test_default_is_v_prediction_and_the_sampler_inherits_it():
    """Guards the default SchedulerConfig.prediction_type "v_prediction" (NAMD's epsilon
    trained from scratch at CPU lengths let DDIM amplify its errors ~100x at large t) and
    that the DDIM inference scheduler uses the training scheduler's prediction type and
    beta schedule (a mismatch would decode v as epsilon)."""
    cfg = SchedulerConfig()
    assert cfg.prediction_type == "v_prediction"
    train, ddim = train_scheduler(cfg), inference_scheduler(cfg)
    assert train.config.prediction_type == ddim.config.prediction_type == "v_prediction"
    torch.testing.assert_close(ddim.alphas_cumprod, train.alphas_cumprod)
    assert inference_scheduler(SchedulerConfig(prediction_type="sample")).config.prediction_type == "sample"
