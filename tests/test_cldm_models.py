"""CLDM token denoiser, forecaster (temporal transformer + latent diffusion over study
tokens), the no-diffusion regressor, their configs and folders."""

import pytest
import torch

from cohortcast.config import ConfigError, from_dict, to_dict
from cohortcast.config.cldm_models import (
    CLDMModelsConfig,
    SegmentationDecoderConfig,
    TokenDenoiserConfig,
    TokenLatentConfig,
    cldm_models_flavor,
)
from cohortcast.config.models import SchedulerConfig, TemporalConfig
from cohortcast.models.cldm_forecaster import CLDMForecaster, random_prior_truncation
from cohortcast.models.errors import ForecasterLoadError
from cohortcast.models.sampler import reverse_loop
from cohortcast.models.study_regressor import StudyRegressor
from cohortcast.models.token_denoiser import TokenDenoiser, group_tokens, ungroup_tokens

DIM = 64  # the debug token width


def tiny_config(**kw) -> CLDMModelsConfig:
    """Small enough to train in seconds: 16-wide tokens on a 4 x 4 (2D) and 2 x 4 x 4 (3D) grid."""
    sections = dict(
        latent=TokenLatentConfig(dim=16, grid_2d=(4, 4), grid_3d=(2, 4, 4)),
        # date_dim 16: MKL computes a (17 -> 8) Linear with row-position-dependent bits, which
        # no fixed micro-batch can hide (measured; 16, 32, 128 wide outputs are exact).
        temporal=TemporalConfig(d_model=32, date_dim=16, num_layers=2, num_heads=4, max_exams=6),
        denoiser=TokenDenoiserConfig(width=32, depth=2, heads=4, target_scale_2d=1.0, target_scale_3d=1.0),
        scheduler=SchedulerConfig(micro_batch=4, num_samples=2),
        segmentation=SegmentationDecoderConfig(channels=(16, 8, 8)),
    )
    cfg = CLDMModelsConfig(**{**sections, **kw})
    cfg.validate()
    return cfg


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """DiT's zero-initialised gates and heads make a fresh denoiser a constant: perturb
    every weight so conditioning and batching are visible in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def priors(cfg: CLDMModelsConfig, b: int, k: int, dims: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.latent.num_tokens(dims)
    tokens = torch.randn(b, k, 1 + n, cfg.latent.dim, generator=g)
    days = torch.sort(torch.rand(b, k, generator=g) * 2000, dim=1, descending=True).values + 30
    return tokens, days, torch.ones(b, k, dtype=torch.bool)


def test_token_groups_are_grid_neighbourhoods_and_invert():
    tokens = torch.arange(512.0).view(1, 512, 1)  # token i at row-major grid position i
    grouped = group_tokens(tokens, (8, 8, 8), (2, 2, 2))
    assert grouped.shape == (1, 64, 8)
    assert grouped[0, 0].tolist() == [0, 1, 8, 9, 64, 65, 72, 73]  # the first 2 x 2 x 2 block
    assert grouped[0, 1].tolist() == [2, 3, 10, 11, 66, 67, 74, 75]  # its neighbour along the last axis
    x = torch.randn(2, 512, 5)
    assert torch.equal(ungroup_tokens(group_tokens(x, (8, 8, 8), (2, 2, 2)), (8, 8, 8), (2, 2, 2)), x)


@pytest.mark.parametrize("dims, n", [(2, 64), (3, 512)])
def test_denoiser_keeps_the_token_shape_of_radiographs_and_ct(dims, n):
    cfg = CLDMModelsConfig()  # debug: 64 radiograph tokens, 512 CT tokens, 64 wide
    den = randomise(TokenDenoiser(cfg.latent, cfg.denoiser))
    x, base = torch.randn(2, 1 + n, DIM), torch.randn(2, 1 + n, DIM)
    out = den(x, torch.tensor([10, 900]), base, torch.randn(2, 2, cfg.denoiser.width))
    assert out.shape == (2, 1 + n, DIM)
    assert not torch.allclose(out[0], den(x[:1], torch.tensor([10]), torch.randn(1, 1 + n, DIM), den.null(1))[0])
    with pytest.raises(ValueError, match="fit no served grid"):
        den(torch.randn(1, 1 + 100, DIM), torch.tensor([1]), torch.randn(1, 101, DIM), den.null(1))


def test_a_fresh_denoiser_is_zero_and_timesteps_matter_once_trained():
    cfg = tiny_config()
    den = TokenDenoiser(cfg.latent, cfg.denoiser)
    x = torch.randn(2, 17, 16)
    assert torch.equal(den(x, torch.tensor([5, 5]), x, den.null(2)), torch.zeros_like(x))  # adaLN-Zero
    randomise(den)
    assert not torch.allclose(
        den(x, torch.tensor([5, 5]), x, den.null(2)), den(x, torch.tensor([800, 800]), x, den.null(2))
    )


def test_null_context_differs_and_guidance_one_is_the_conditional_output():
    cfg = tiny_config()
    f = randomise(CLDMForecaster(cfg))
    tokens, days, mask = priors(cfg, 2, 3)
    context, baseline = f.context(tokens, days, mask)
    den = f.denoiser
    x, t = torch.randn_like(baseline), torch.tensor([300, 300])
    cond, uncond = den(x, t, baseline, context), den(x, t, baseline, den.null(2))
    assert (cond - uncond).abs().max() > 1e-3
    guided = lambda scale: uncond + scale * (cond - uncond)  # noqa: E731 - reverse_loop's formula
    torch.testing.assert_close(guided(1.0), cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(guided(0.0), uncond, rtol=0, atol=0)
    # Dropped rows get exactly the null tokens; the others keep theirs.
    dropped, _ = f.context(tokens, days, mask, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], den.null(1)[0]) and torch.equal(dropped[1], context[1])
    # Through the sampler: scale 1 is the conditional model alone, scale 3 moves the samples.
    sched = f.inference_scheduler()
    noise = torch.randn_like(baseline)
    plain = reverse_loop(den, sched, noise, baseline, context, steps=3, guidance_scale=1.0)
    assert not torch.allclose(plain, reverse_loop(den, sched, noise, baseline, context, steps=3, guidance_scale=3.0))
    # The temporal summary and the target date both reach the context.
    later, _ = f.context(tokens, days + 200, mask)
    assert not torch.allclose(later, context)


@pytest.mark.parametrize(("eta", "summary"), [(0.0, "cls"), (0.5, "cls"), (0.0, "pooled")])
def test_a_case_gives_the_same_forecast_alone_or_in_any_batch(eta, summary):
    """Bit-identical samples for a case whatever shares its call: other cases with more or
    fewer priors (padded), more rows than one micro-batch (4 rows = 2 cases x 2 samples);
    with the learned prior pool too (it runs inside the fixed micro-batches)."""
    cfg = tiny_config()
    cfg.prior_summary = summary
    f = randomise(CLDMForecaster(cfg)).eval()
    tokens, days, mask = priors(cfg, 5, 4, seed=1)
    mask[0, :2] = False  # case 0 has 2 priors, the others 4
    kw = dict(num_samples=2, seed=7, steps=4, eta=eta)
    torch.manual_seed(123)  # the sampler must not read the global RNG
    batch = f.forecast(tokens, days, mask, ["a", "b", "c", "d", "e"], **kw)
    torch.manual_seed(999)
    alone = f.forecast(tokens[:1, 2:], days[:1, 2:], mask[:1, 2:], ["a"], **kw)  # its 2 real priors only
    assert torch.equal(alone.samples[0], batch.samples[0])
    last = f.forecast(tokens[4:], days[4:], mask[4:], ["e"], **kw)
    assert torch.equal(last.samples[0], batch.samples[4])
    middle = f.forecast(tokens[3:4], days[3:4], mask[3:4], ["d"], **kw)  # rows 2-3 of a chunk in the batch
    assert torch.equal(middle.samples[0], batch.samples[3])
    assert not torch.equal(batch.samples[0, 0], batch.samples[0, 1])  # samples differ
    assert batch.samples.shape == (5, 2, 33, 16) and batch.variance.shape == (5, 33, 16)
    torch.testing.assert_close(batch.variance, batch.samples.var(dim=1))
    other_seed = f.forecast(tokens[:1, 2:], days[:1, 2:], mask[:1, 2:], ["a"], **{**kw, "seed": 8})
    assert not torch.equal(other_seed.samples, alone.samples)


def test_the_forecast_builds_on_the_most_recent_prior():
    cfg = tiny_config()
    f = CLDMForecaster(cfg).eval()
    tokens, days, mask = priors(cfg, 1, 3)
    days = torch.tensor([[100.0, 800.0, 400.0]])  # not sorted by date: the first is the most recent
    out = f.forecast(tokens, days, mask, ["a"], num_samples=1, steps=2)
    assert torch.equal(out.baseline[0], tokens[0, 0])
    mask[0, 0] = False
    assert torch.equal(f.forecast(tokens, days, mask, ["a"], num_samples=1, steps=2).baseline[0], tokens[0, 2])


def train(model, batch, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """(first, last) loss of `steps` Adam steps on one fixed batch (fixed t and noise)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.loss(*batch, generator=torch.Generator().manual_seed(0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.parametrize("cls", [CLDMForecaster, StudyRegressor])
def test_loss_falls_on_a_fixed_batch(cls):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = cls(cfg)
    tokens, days, mask = priors(cfg, 4, 3, dims=2)
    target = tokens[:, -1] + 0.5 * torch.randn(4, 17, 16, generator=torch.Generator().manual_seed(3))
    first, last = train(model, (tokens, days, mask, target), steps=40)
    assert last < 0.1 * first, (first, last)
    out = model.loss(tokens, days, mask, target)
    assert out.predicted.shape == target.shape and out.loss.ndim == 0


def test_the_regressor_is_deterministic():
    cfg = tiny_config()
    reg = randomise(StudyRegressor(cfg)).eval()
    tokens, days, mask = priors(cfg, 3, 2)
    out = reg.forecast(tokens, days, mask, ["a", "b", "c"], num_samples=3, seed=1)
    assert torch.equal(out.variance, torch.zeros_like(out.variance))
    assert torch.equal(out.samples[:, 0], out.samples[:, 2])
    alone = reg.forecast(tokens[1:2], days[1:2], mask[1:2], ["b"], num_samples=3, seed=9)
    assert torch.equal(alone.samples[0], out.samples[1])


def test_target_scale_and_change_target():
    cfg = tiny_config()
    cfg.denoiser.target_scale_3d = None
    f = CLDMForecaster(cfg)
    tokens, days, mask = priors(cfg, 4, 2)
    target = tokens[:, -1] + 2.0 * torch.randn(4, 33, 16)
    with pytest.raises(ValueError, match="target_scale_3d is unset"):
        f.loss(tokens, days, mask, target)
    scale = f.fit_target_scale(target, f.baseline(tokens, days, mask))
    generated = f.to_generated(target, f.baseline(tokens, days, mask))
    assert abs(float(generated.std()) - 1.0) < 1e-4 and 0.4 < scale < 0.6
    torch.testing.assert_close(f.from_generated(generated, f.baseline(tokens, days, mask)), target)


def test_random_prior_truncation_keeps_the_most_recent():
    days = torch.tensor([[900.0, 300.0, 600.0, 5.0]]).expand(2000, -1)
    mask = torch.tensor([[True, True, True, False]]).expand(2000, -1)
    kept = random_prior_truncation(days, mask, torch.Generator().manual_seed(0))
    counts = kept.sum(dim=1)
    assert set(counts.tolist()) == {1, 2, 3}  # 1, some and all priors all occur
    assert kept[:, 1].all() and not kept[:, 3].any()  # the most recent real prior always; padding never
    assert torch.equal(kept[counts == 2][:, 2], torch.ones(int((counts == 2).sum()), dtype=torch.bool))


def test_save_load_round_trip_and_refusals(tmp_path):
    cfg = tiny_config()
    f = randomise(CLDMForecaster(cfg)).eval()
    tokens, days, mask = priors(cfg, 2, 2)
    f.save(tmp_path / "cldm")
    back = CLDMForecaster.load(tmp_path / "cldm", expected=tiny_config())
    kw = dict(num_samples=2, seed=3, steps=3)
    assert torch.equal(
        back.forecast(tokens, days, mask, ["a", "b"], **kw).samples,
        f.forecast(tokens, days, mask, ["a", "b"], **kw).samples,
    )  # noqa: E501
    # Sampling settings may differ; the architecture may not.
    CLDMForecaster.load(tmp_path / "cldm", expected=tiny_config(scheduler=SchedulerConfig(inference_steps=7)))
    wider = tiny_config()
    wider.denoiser.width = 64
    with pytest.raises(ForecasterLoadError, match="denoiser.width: saved 32, expected 64"):
        CLDMForecaster.load(tmp_path / "cldm", expected=wider)
    with pytest.raises(ForecasterLoadError, match="not a study_regressor folder"):
        StudyRegressor.load(tmp_path / "cldm")
    # Weights that do not fit the config are refused too (a hand-edited config).
    json_path = tmp_path / "cldm" / "cldm_forecaster.json"
    json_path.write_text(json_path.read_text().replace('"depth": 2', '"depth": 3'))
    with pytest.raises(ForecasterLoadError, match="missing denoiser.blocks.2"):
        CLDMForecaster.load(tmp_path / "cldm")


def test_configs_validate_and_load_by_flavour():
    paper = from_dict(CLDMModelsConfig, {"flavor": "paper", "scheduler": {"inference_steps": 25}})
    assert paper.latent.dim == 768 and paper.denoiser.width == 768 and paper.scheduler.inference_steps == 25
    assert to_dict(from_dict(CLDMModelsConfig, to_dict(paper))) == to_dict(paper)
    with pytest.raises(ConfigError, match="group_3d"):
        from_dict(CLDMModelsConfig, {"denoiser": {"group_3d": [3, 2, 2]}})
    with pytest.raises(ConfigError, match="unknown flavour 'papr'.*did you mean 'paper'"):
        cldm_models_flavor("papr")
    with pytest.raises(ConfigError, match="same token count"):
        from_dict(CLDMModelsConfig, {"latent": {"grid_2d": [16, 32]}})


def test_paper_size_builds_with_the_expected_parameter_counts():
    cfg = cldm_models_flavor("paper")
    with torch.device("meta"):  # no memory: only shapes
        f = CLDMForecaster(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # DiT-B-sized denoiser (12 blocks of self- and cross-attention, MLP, adaLN at width 768)
    # and a 4-layer 768-wide temporal transformer.
    assert 150e6 < count(f.denoiser) < 200e6, count(f.denoiser)
    assert 25e6 < count(f.temporal) < 35e6, count(f.temporal)
    debug = CLDMForecaster(CLDMModelsConfig())
    assert 1e6 < count(debug) < 3e6, count(debug)


def test_the_last_prior_can_join_the_context():
    cfg = tiny_config(
        denoiser=TokenDenoiserConfig(width=32, depth=1, heads=4, prior_in_context=True, target_scale_3d=1.0)
    )
    f = randomise(CLDMForecaster(cfg)).eval()
    tokens, days, mask = priors(cfg, 2, 3)
    context, _ = f.context(tokens, days, mask)
    assert context.shape == (2, 3, 32) and f.denoiser.null(2).shape == (2, 3, 32)
    other = tokens.clone()
    other[:, -1, 1:] += 1.0  # only the most recent prior's patch tokens change
    assert not torch.allclose(f.context(other, days, mask)[0][:, 2], context[:, 2])
    assert f.forecast(tokens, days, mask, ["a", "b"], num_samples=2, steps=2).samples.shape == (2, 2, 33, 16)
