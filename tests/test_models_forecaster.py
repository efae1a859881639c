"""Temporal context, conditional denoiser, seeded multi-sample DDIM and the Forecaster."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import forecaster_config

from cohortcast.config.models import (
    ConditionerConfig,
    DenoiserConfig,
    ForecasterConfig,
    SchedulerConfig,
    TemporalConfig,
)
from cohortcast.models.denoiser import ConditionalDenoiser
from cohortcast.models.ehr_prompt import render_ehr_prompt
from cohortcast.models.forecaster import Forecaster, ForecasterLoadError
from cohortcast.models.sampler import forecast_latents, reverse_loop, sample_seed
from cohortcast.models.schedulers import training_target
from cohortcast.models.temporal import TemporalContextEncoder
from cohortcast.models.tiny_llm import write_tiny_gemma3

# One EHR record (manifest column names) per case; the LLM conditioner reads them rendered.
RECORDS = [
    {"SCT_PRE_ATT": "Soft Tissue", "SCT_EPI_LOC": "Right Upper Lobe", "SCT_LONG_DIA": 9.0, "age": 61.0},
    {"SCT_PRE_ATT": "Part Solid", "SCT_EPI_LOC": "Lingula", "SCT_LONG_DIA": 14.0, "SCT_MARGINS": "Spiculated"},
    {"SCT_PRE_ATT": "Ground Glass", "SCT_LONG_DIA": 6.0, "gender": "Female"},
]
LATENT = (4, 8, 8)  # VAEConfig default: factor 4, 32 px crops


@pytest.fixture(scope="module")
def llm_path(tmp_path_factory):
    return str(write_tiny_gemma3(tmp_path_factory.mktemp("llm") / "gemma", [render_ehr_prompt(r) for r in RECORDS]))


@pytest.fixture(scope="module")
def forecaster(llm_path):
    torch.manual_seed(0)
    return Forecaster(forecaster_config(conditioner=ConditionerConfig(llm_path=llm_path, num_soft_prompts=2))).eval()


def test_temporal_encoder_ignores_padding_exams():
    torch.manual_seed(0)
    enc = TemporalContextEncoder(TemporalConfig(), latent_numel=16, out_dim=24).eval()
    latents = torch.randn(1, 2, 4, 2, 2)
    days = torch.tensor([[700.0, 365.0]])
    summary, target = enc(latents, days, torch.ones(1, 2, dtype=torch.bool), torch.tensor([365.0]))
    padded = torch.cat([latents, torch.randn(1, 2, 4, 2, 2)], 1)
    mask = torch.tensor([[True, True, False, False]])
    summary_p, _ = enc(padded, torch.tensor([[700.0, 365.0, 5.0, 9.0]]), mask, torch.tensor([365.0]))
    torch.testing.assert_close(summary, summary_p, rtol=1e-5, atol=1e-5)
    other, _ = enc(latents, torch.tensor([[900.0, 365.0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([365.0]))
    assert not torch.allclose(summary, other)  # dates matter
    assert summary.shape == target.shape == (1, 24)
    with pytest.raises(ValueError, match="at least one prior exam"):
        enc(latents, days, torch.zeros(1, 2, dtype=torch.bool), torch.tensor([1.0]))


def test_training_step_gradients_reach_every_trainable_part(forecaster):
    f = forecaster.train()
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    baseline = f.vae.encode_for_diffusion(images)
    target = torch.randn_like(baseline)
    horizon = torch.tensor([365.0, 400.0, 300.0])
    ctx = f.context(
        RECORDS, *f.encode_priors(baseline, horizon, None, None, None), horizon, drop=torch.tensor([False, True, False])
    )
    sched = f.train_scheduler()
    noise = torch.randn_like(target)
    t = torch.randint(0, sched.config.num_train_timesteps, (3,))
    loss = F.mse_loss(
        f.denoiser(sched.add_noise(target, noise, t), t, baseline, ctx), training_target(sched, target, noise, t)
    )  # v by default
    f.zero_grad()
    loss.backward()
    for name in (
        "denoiser.unet.conv_in.weight",
        "denoiser.ehr_proj.weight",
        "denoiser.null_context",
        "temporal.latent_proj.weight",
        "temporal.target_date.proj.weight",
        "conditioner.soft_prompts",
    ):
        grad = dict(f.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in f.conditioner.lm.parameters())
    assert f.denoiser.unet.conv_in.in_channels == 8  # noisy + baseline latents (NAMD App. B)
    f.eval()


def _reference_diffusers_loop(unet, scheduler, latents, cond, steps):
    """The loop diffusers' latent pipelines run (scale_model_input -> unet -> step)."""
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        noise_pred = unet(model_in, t, encoder_hidden_states=cond["context"], return_dict=False)[0]
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def test_ddim_loop_equals_diffusers_loop(forecaster):
    f = forecaster
    torch.manual_seed(1)
    baseline, noise, ctx = torch.randn(2, *LATENT), torch.randn(2, *LATENT), torch.randn(2, 3, 64)

    class ConcatUNet(torch.nn.Module):  # the unet diffusers sees: baseline concatenated inside
        def forward(self, x, t, encoder_hidden_states, return_dict=False):
            return (
                f.denoiser.unet(torch.cat([x, baseline], 1), t, encoder_hidden_states=encoder_hidden_states).sample,
            )

    with torch.no_grad():
        ours = reverse_loop(f.denoiser, f.inference_scheduler(), noise, baseline, ctx, steps=10)
        ref = _reference_diffusers_loop(ConcatUNet(), f.inference_scheduler(), noise, {"context": ctx}, 10)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def _forecast(f, case_ids, records, seed=3, **kw):
    torch.manual_seed(123)  # the sampler must not depend on the global RNG: reset it differently below
    images = torch.stack([torch.full((1, 32, 32), 0.1 * (i + 1)) for i in range(len(case_ids))])
    horizon = torch.tensor([365.0 + 30 * i for i in range(len(case_ids))])
    return f.forecast(images, horizon, case_ids, ehr=records, num_samples=4, seed=seed, steps=6, **kw)


def test_dpm_solver_loop_equals_diffusers_loop(forecaster):
    """Our loop with DPM-Solver++ (a multistep solver: state between steps) is diffusers'."""
    f = forecaster
    torch.manual_seed(2)
    baseline, noise, ctx = torch.randn(2, *LATENT), torch.randn(2, *LATENT), torch.randn(2, 3, 64)

    class ConcatUNet(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, return_dict=False):
            return (
                f.denoiser.unet(torch.cat([x, baseline], 1), t, encoder_hidden_states=encoder_hidden_states).sample,
            )

    scheduler = f.inference_scheduler("dpmsolver++")
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    with torch.no_grad():
        ours = reverse_loop(f.denoiser, scheduler, noise, baseline, ctx, steps=7)
        again = reverse_loop(f.denoiser, scheduler, noise, baseline, ctx, steps=7)  # no state left over
        ref = _reference_diffusers_loop(ConcatUNet(), f.inference_scheduler("dpmsolver++"), noise, {"context": ctx}, 7)
        ddim = reverse_loop(f.denoiser, f.inference_scheduler("ddim"), noise, baseline, ctx, steps=7)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.equal(ours, again) and not torch.allclose(ours, ddim)
    with pytest.raises(ValueError, match="takes no eta"):
        reverse_loop(f.denoiser, scheduler, noise, baseline, ctx, steps=3, eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        f.inference_scheduler("euler")


class _GaussianDataDenoiser:
    """The exact v-prediction for data x0 ~ N(mean, std^2) per element: the probability-flow
    ODE then maps start noise z to mean + std * z, so a sampler's error is measurable."""

    def __init__(self, alphas_cumprod, mean: float, std: float):
        self.a, self.mean, self.var = alphas_cumprod, mean, std**2

    def null(self, batch):
        return torch.zeros(batch, 1, 1)

    def __call__(self, noisy, t, baseline, context):
        a = self.a[int(t)].double()
        x = noisy.double()
        x0 = self.mean + a.sqrt() * self.var / (a * self.var + 1 - a) * (x - a.sqrt() * self.mean)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()


def test_dpm_solver_reaches_the_ode_solution_in_fewer_steps_than_ddim():
    """Why DPM-Solver++ is offered: on a denoiser whose ODE solution is known in closed
    form, 10 DPM-Solver++ steps land closer to it than 10 DDIM steps, and as close as
    50 DDIM steps."""
    from cohortcast.config.models import SchedulerConfig
    from cohortcast.models.schedulers import inference_scheduler

    cfg = SchedulerConfig()
    denoiser = _GaussianDataDenoiser(inference_scheduler(cfg).alphas_cumprod, mean=0.7, std=0.3)
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    exact = 0.7 + 0.3 * z
    zeros, ctx = torch.zeros_like(z), torch.zeros(256, 1, 1)

    def error(sampler, steps):
        out = reverse_loop(denoiser, inference_scheduler(cfg, sampler), z, zeros, ctx, steps=steps)
        return float((out - exact).abs().mean())

    # Measured: DDIM 10/50 steps 0.087/0.020, DPM-Solver++ 10 steps 0.006.
    dpm10, ddim10, ddim50 = error("dpmsolver++", 10), error("ddim", 10), error("ddim", 50)
    assert dpm10 < 0.2 * ddim10, (dpm10, ddim10)
    assert dpm10 < 0.5 * ddim50, (dpm10, ddim50)
    assert error("dpmsolver++", 50) < 0.003


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 0.5), ("dpmsolver++", 0.0)])
def test_a_case_gives_the_same_forecast_alone_or_in_any_batch(forecaster, sampler, eta):
    batch = _forecast(forecaster, ["c0", "c1", "c2"], RECORDS, eta=eta, sampler=sampler)
    torch.manual_seed(999)
    alone = forecaster.forecast(
        torch.full((1, 1, 32, 32), 0.2),
        torch.tensor([395.0]),
        ["c1"],
        ehr=RECORDS[1:2],
        num_samples=4,
        seed=3,
        steps=6,
        eta=eta,
        sampler=sampler,
    )
    assert torch.equal(alone.samples[0], batch.samples[1])
    # More cases than one micro-batch holds (scheduler.micro_batch = 20 rows, 4 samples each).
    many = forecaster.forecast(
        torch.full((7, 1, 32, 32), 0.2),
        torch.full((7,), 395.0),
        [f"x{i}" for i in range(6)] + ["c1"],
        ehr=[RECORDS[0]] * 6 + [RECORDS[1]],
        num_samples=4,
        seed=3,
        steps=6,
        eta=eta,
        sampler=sampler,
    )
    assert torch.equal(many.samples[6], alone.samples[0])
    # One seed per case (how the service batches requests with different seeds): each case
    # matches its own single-seed call, even the same case id under two seeds.
    mixed = forecaster.forecast(
        torch.full((3, 1, 32, 32), 0.2),
        torch.full((3,), 395.0),
        ["c1", "c1", "x0"],
        ehr=[RECORDS[1]] * 3,
        num_samples=4,
        seed=[3, 8, 3],
        steps=6,
        eta=eta,
        sampler=sampler,
    )
    other_seed = forecaster.forecast(
        torch.full((1, 1, 32, 32), 0.2),
        torch.tensor([395.0]),
        ["c1"],
        ehr=RECORDS[1:2],
        num_samples=4,
        seed=8,
        steps=6,
        eta=eta,
        sampler=sampler,
    )
    assert torch.equal(mixed.samples[0], alone.samples[0]) and torch.equal(mixed.samples[1], other_seed.samples[0])


def test_samples_mean_variance_and_seeds(forecaster):
    out = _forecast(forecaster, ["c0", "c1"], RECORDS[:2])
    assert out.samples.shape == (2, 4, 1, 32, 32) and out.latents.shape == (2, 4, *LATENT)
    assert out.baseline_latent.shape == (2, *LATENT)
    torch.testing.assert_close(out.mean, out.samples.mean(1))
    torch.testing.assert_close(out.variance, out.samples.var(1))
    assert (out.variance > 0).all()  # different seeds, different samples
    assert not torch.equal(out.samples, _forecast(forecaster, ["c0", "c1"], RECORDS[:2], seed=4).samples)
    assert len({sample_seed(0, "c0", k) for k in range(100)}) == 100


def test_guidance_scale_changes_the_forecast(forecaster):
    plain = _forecast(forecaster, ["c0"], RECORDS[:1])
    guided = _forecast(forecaster, ["c0"], RECORDS[:1], guidance_scale=3.0)
    assert not torch.allclose(plain.samples, guided.samples)


def test_save_load_round_trip(forecaster, tmp_path):
    forecaster.save(tmp_path / "fc")
    meta = json.loads((tmp_path / "fc" / "forecaster.json").read_text())
    assert meta["format_version"] == 3 and meta["llm"]["model_type"] == "gemma3_text"
    assert meta["config"]["vae"]["scaling_factor"] == 1.0 and meta["config"]["denoiser"]["change_scale"] == 1.0
    assert (tmp_path / "fc" / "scheduler" / "scheduler_config.json").is_file()
    loaded = Forecaster.load(tmp_path / "fc")
    a, b = _forecast(forecaster, ["c0", "c1"], RECORDS[:2]), _forecast(loaded, ["c0", "c1"], RECORDS[:2])
    assert torch.equal(a.samples, b.samples)


def test_load_errors_are_clear(forecaster, tmp_path, llm_path):
    with pytest.raises(ForecasterLoadError, match="not a Forecaster folder"):
        Forecaster.load(tmp_path)
    forecaster.save(tmp_path / "fc")
    meta_path = tmp_path / "fc" / "forecaster.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["denoiser"]["block_out_channels"] = [16, 32]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ForecasterLoadError, match="weights do not fit the config.*denoiser.unet"):
        Forecaster.load(tmp_path / "fc")
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ForecasterLoadError, match="format version 99"):
        Forecaster.load(tmp_path / "fc")
    other_llm = write_tiny_gemma3(tmp_path / "other", [render_ehr_prompt(r) for r in RECORDS], hidden_size=48)
    forecaster.save(tmp_path / "fc2")
    with pytest.raises(ForecasterLoadError, match="the Forecaster was trained with"):
        Forecaster.load(tmp_path / "fc2", llm_path=str(other_llm))


def test_forecast_latents_validates_inputs(forecaster):
    with pytest.raises(ValueError, match="unique"):
        forecast_latents(
            forecaster.denoiser,
            forecaster.inference_scheduler(),
            torch.zeros(2, *LATENT),
            torch.zeros(2, 3, 64),
            ["a", "a"],
            2,
            0,
            2,
        )
    with pytest.raises(ValueError, match="seeds for"):
        forecast_latents(
            forecaster.denoiser,
            forecaster.inference_scheduler(),
            torch.zeros(2, *LATENT),
            torch.zeros(2, 3, 64),
            ["a", "b"],
            2,
            [0],
            2,
        )


def test_condition_dropout_rate_and_null_rows(forecaster):
    from cohortcast.models.denoiser import condition_dropout_mask

    mask = condition_dropout_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.1) < 0.01
    temporal, target = torch.randn(2, 64), torch.randn(2, 64)
    ctx = forecaster.denoiser.build_context(None, temporal, target, drop=torch.tensor([True, False]))
    torch.testing.assert_close(ctx[0], forecaster.denoiser.null_context)
    torch.testing.assert_close(ctx[1, 1:], torch.stack([temporal[1], target[1]]))


def test_ehr_without_encoder_is_an_error():
    f = Forecaster(forecaster_config()).eval()
    with pytest.raises(ValueError, match="no EHR encoder"):
        f.forecast(torch.zeros(1, 1, 32, 32), torch.tensor([365.0]), ["a"], ehr=RECORDS[:1], num_samples=1, steps=1)
    out = f.forecast(torch.zeros(1, 1, 32, 32), torch.tensor([365.0]), ["a"], num_samples=1, steps=1)
    assert out.samples.shape == (1, 1, 1, 32, 32) and torch.equal(out.variance, torch.zeros(1, 1, 32, 32))


def test_prior_exams_feed_the_temporal_context(forecaster):
    """Several prior exams (padded, masked) are encoded and change the forecast."""
    images = torch.full((1, 1, 32, 32), 0.2)
    common = dict(ehr=RECORDS[:1], num_samples=2, seed=1, steps=3)
    single = forecaster.forecast(images, torch.tensor([365.0]), ["p"], **common)
    priors = torch.stack([torch.full((1, 32, 32), -0.5), torch.full((1, 32, 32), 0.2), torch.zeros(1, 32, 32)])[None]
    multi = forecaster.forecast(
        images,
        torch.tensor([365.0]),
        ["p"],
        prior_images=priors,
        days_before_target=torch.tensor([[730.0, 365.0, 0.0]]),
        exam_mask=torch.tensor([[True, True, False]]),
        **common,
    )
    assert multi.samples.shape == single.samples.shape and not torch.equal(multi.samples, single.samples)


def test_fresh_denoiser_ignores_the_baseline():
    """Guards build_unet zeroing the baseline half of a fresh U-Net's conv_in: stage c
    feeds a zero baseline, so those weights would otherwise reach stage d as random
    noise. (Before: random weights, the output depended on the baseline.)"""
    torch.manual_seed(0)
    denoiser = ConditionalDenoiser(DenoiserConfig(), LATENT[0], LATENT[1], ehr_dim=None).eval()
    assert torch.count_nonzero(denoiser.unet.conv_in.weight[:, LATENT[0] :]) == 0
    assert torch.count_nonzero(denoiser.unet.conv_in.weight[:, : LATENT[0]]) > 0
    noisy, t, ctx = torch.randn(2, *LATENT), torch.tensor([10, 900]), torch.randn(2, 3, 64)
    with torch.no_grad():
        a = denoiser(noisy, t, torch.randn(2, *LATENT), ctx)
        b = denoiser(noisy, t, 5 * torch.randn(2, *LATENT), ctx)
    assert torch.equal(a, b)


def test_change_target_maps_to_and_from_the_generated_space():
    """Guards DenoiserConfig.target "change": the denoiser generates (follow-up - baseline)
    * change_scale, from_generated inverts it exactly (also broadcast over samples), and
    "absolute" is the identity; an unset change_scale is an error, not a silent 1."""
    torch.manual_seed(0)
    follow_up, baseline = torch.randn(3, *LATENT, dtype=torch.float64), torch.randn(3, *LATENT, dtype=torch.float64)
    f = Forecaster(forecaster_config(denoiser=DenoiserConfig(change_scale=2.5)))
    generated = f.to_generated(follow_up, baseline)
    torch.testing.assert_close(generated, (follow_up - baseline) * 2.5)
    torch.testing.assert_close(f.from_generated(generated, baseline), follow_up)
    samples = torch.stack([generated, 2 * generated], 1)  # (B, N, c, h, w)
    torch.testing.assert_close(f.from_generated(samples, baseline[:, None])[:, 0], follow_up)
    absolute = Forecaster(forecaster_config(denoiser=DenoiserConfig(target="absolute")))
    assert torch.equal(absolute.to_generated(follow_up, baseline), follow_up)
    assert torch.equal(absolute.from_generated(follow_up, baseline), follow_up)
    unset = Forecaster(ForecasterConfig(denoiser=DenoiserConfig(change_scale=None)))
    with pytest.raises(ValueError, match="change_scale is unset"):
        unset.to_generated(follow_up, baseline)


def test_forecast_latents_are_follow_up_latents():
    """Guards Forecast.latents = baseline latent + generated change / change_scale (not
    the raw generated change) and Forecast.baseline_latent = the baseline's latent."""
    torch.manual_seed(0)
    f = Forecaster(forecaster_config(denoiser=DenoiserConfig(change_scale=4.0))).eval()
    images, horizon = torch.rand(2, 1, 32, 32) * 2 - 1, torch.tensor([365.0, 500.0])
    out = f.forecast(images, horizon, ["a", "b"], num_samples=2, seed=1, steps=3)
    baseline = f.vae.encode_for_diffusion(images)
    torch.testing.assert_close(out.baseline_latent, baseline)
    with torch.no_grad():
        ctx = f.context(None, *f.encode_priors(baseline, horizon, None, None, None), horizon)
        change = forecast_latents(f.denoiser, f.inference_scheduler(), baseline, ctx, ["a", "b"], 2, 1, 3).samples
    torch.testing.assert_close(out.latents, baseline[:, None] + change / 4.0, rtol=1e-4, atol=1e-5)


def test_regression_forecaster_is_deterministic_and_batch_independent():
    """Guards ForecasterConfig.kind "regression" (the no-diffusion baseline): its N
    samples are the one prediction (variance exactly 0), bit-identical alone or batched."""
    torch.manual_seed(0)
    f = Forecaster(forecaster_config(kind="regression", scheduler=SchedulerConfig(micro_batch=4))).eval()
    images = torch.stack([torch.full((1, 32, 32), 0.1 * (i + 1)) for i in range(6)])
    horizon = torch.tensor([365.0 + 30 * i for i in range(6)])
    ids = [f"r{i}" for i in range(6)]
    batch = f.forecast(images, horizon, ids, num_samples=3, seed=0, steps=4)
    assert batch.samples.shape == (6, 3, 1, 32, 32)
    assert all(torch.equal(batch.samples[:, 0], batch.samples[:, k]) for k in (1, 2))
    assert torch.count_nonzero(batch.variance) == 0
    alone = f.forecast(images[4:5], horizon[4:5], ids[4:5], num_samples=3, seed=7, steps=2)
    assert torch.equal(alone.samples[0], batch.samples[4])  # nor do seed and steps matter
    with torch.no_grad():
        baseline = f.vae.encode_for_diffusion(images[4:5])
        ctx = f.context(None, *f.encode_priors(baseline, horizon[4:5], None, None, None), horizon[4:5])
        direct = f.from_generated(f.regress(baseline, ctx), baseline)
    # `direct` runs one row, not the fixed micro-batch of 4: CPU kernels may reduce in
    # another order (seen here: 1.5e-6 on 1 of 256 values, also on the commit before this
    # one), so this is a closeness check; the bit-identity claims are the equal() above.
    torch.testing.assert_close(alone.latents[:, 0], direct, rtol=1e-4, atol=1e-5)


def test_fixed_chunks_have_one_memory_layout():
    """Guards run_fixed_chunks handing every chunk to the network in one memory layout:
    sampled latents came back channels-last, an unpadded slice kept that layout while a
    padded chunk (torch.cat) was contiguous, and CPU convolutions give other bits for
    the two (a case's forecast then depended on where it fell in the batch)."""
    from cohortcast.models.sampler import run_fixed_chunks

    x = torch.randn(6, 4, 8, 8).to(memory_format=torch.channels_last)
    layouts = []

    def fn(part):
        layouts.append(part.is_contiguous())
        return part * 2

    out = run_fixed_chunks(fn, [x], 4)
    assert layouts == [True, True] and torch.equal(out, x * 2)
