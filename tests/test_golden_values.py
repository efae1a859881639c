"""Golden values: small slices of what tiny fixed-seed models compute, pinned as numbers.

The other model tests check properties (shapes, invariances, agreement with a reference
loop); a change can keep every property and still move the numbers: a reordered
initialisation, a changed default, an off-by-one timestep, a swapped concatenation. These
tests pin the numbers themselves (the diffusers lesson), each as a few scalars and a 3x3
slice, to 1e-4.

The expected values were produced by this file's own functions on CPU, in float32, on
one thread, with the versions pinned in constraints/cpu.txt. After a deliberate change of
what a model computes (or an upgrade of torch/diffusers that changes initialisation or
kernels), rerun `python tests/test_golden_values.py` and paste what it prints, saying in
the commit why the numbers moved.
"""

from __future__ import annotations

import pytest
import torch

from conftest import forecaster_config

from cohortcast.config.models import DenoiserConfig, SchedulerConfig, VAEConfig, VAELossConfig
from cohortcast.models.alignment import alignment_loss, nodule_features
from cohortcast.models.denoiser import ConditionalDenoiser
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.perceptual import LPIPS
from cohortcast.models.schedulers import inference_scheduler
from cohortcast.models.vae import NoduleVAE
from cohortcast.models.vae_loss import vae_loss

TOLERANCE = 1e-4
LATENT = (4, 8, 8)  # the tiny VAE's latent for 32 px crops (VAEConfig defaults)

# Nodule rows for the alignment features: sizes, attributes, and a row with nothing known.
ROWS = [
    {
        "SCT_LONG_DIA": 12.0,
        "SCT_PERP_DIA": 8.0,
        "SCT_PRE_ATT": "Part Solid",
        "SCT_MARGINS": "Spiculated",
        "SCT_EPI_LOC": "Lingula",
    },
    {"SCT_LONG_DIA": 5.0, "SCT_PERP_DIA": 4.0, "SCT_PRE_ATT": "Soft Tissue", "SCT_EPI_LOC": "Right Upper Lobe"},
    {"SCT_LONG_DIA": 7.5, "SCT_PERP_DIA": 6.0, "SCT_PRE_ATT": "Ground Glass", "SCT_MARGINS": "Smooth"},
    {
        "SCT_LONG_DIA": 20.0,
        "SCT_PERP_DIA": 15.0,
        "SCT_PRE_ATT": "Soft Tissue",
        "SCT_MARGINS": "Poorly Defined",
        "SCT_EPI_LOC": "Left Lower Lobe",
    },
    {},
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Reduction order, hence the last bits, can depend on the thread count."""


def fixed(shape: tuple[int, ...], seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """A fixed input, drawn from its own generator (independent of the global RNG)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * (high - low) + low


def wake_baseline_channels(unet, latent_channels: int, seed: int) -> None:
    """A freshly built U-Net has zero weights on the baseline half of conv_in (it starts
    out ignoring the baseline, see models/denoiser.py); give them seeded values so the
    pinned numbers depend on how the baseline enters too."""
    with torch.no_grad():
        unet.conv_in.weight[:, latent_channels:] = 0.05 * torch.randn(
            unet.conv_in.weight[:, latent_channels:].shape, generator=torch.Generator().manual_seed(seed)
        )


def corner(t: torch.Tensor) -> list[list[float]]:
    """The top-left 3x3 of a (..., H, W) tensor's first plane."""
    return t.reshape(-1, *t.shape[-2:])[0, :3, :3].tolist()


# ----- what is pinned: each function returns {name: number or 3x3 list} ------------------


def tiny_vae() -> NoduleVAE:
    torch.manual_seed(0)
    return NoduleVAE(VAEConfig(scaling_factor=1.0)).eval()


@torch.no_grad()
def vae_values() -> dict:
    vae = tiny_vae()
    x = fixed((2, 1, 32, 32), seed=1)
    posterior = vae.encode(x)
    decoded = vae.decode(posterior.mean)
    return {
        "mean": corner(posterior.mean[1]),
        "mean_avg": posterior.mean.mean().item(),
        "logvar_avg": posterior.logvar.mean().item(),
        "decoded": corner(decoded[1]),
        "decoded_avg": decoded.mean().item(),
        "probe_logit": vae.probe_logit(posterior.mean).tolist(),
    }


@torch.no_grad()
def vae_loss_values() -> dict:
    vae = tiny_vae()
    x = fixed((len(ROWS), 1, 32, 32), seed=2)
    out = vae(x, sample=True, generator=torch.Generator().manual_seed(3))
    cfg = VAELossConfig()
    features = nodule_features(ROWS, cfg.diameter_scale_mm)
    terms = vae_loss(out, x, features, torch.tensor([1, 0, -1, 1, -1]), cfg)  # no LPIPS weights: term is 0
    return {name: value.item() for name, value in terms.items()}


def alignment_values() -> dict:
    cfg = VAELossConfig()  # the default temperatures and diameter scale
    features = nodule_features(ROWS, cfg.diameter_scale_mm)
    latents = fixed((len(ROWS), *LATENT), seed=4, low=-2.0, high=2.0)
    return {
        "default_temperatures": alignment_loss(features, latents, cfg.tau_f, cfg.tau_z).item(),
        "tau_f_0.5_tau_z_3": alignment_loss(features, latents, 0.5, 3.0).item(),
        "features_row0": features[0].tolist(),
    }


@torch.no_grad()
def unet_step_values() -> dict:
    torch.manual_seed(0)
    denoiser = ConditionalDenoiser(DenoiserConfig(), LATENT[0], LATENT[1], ehr_dim=None).eval()
    wake_baseline_channels(denoiser.unet, LATENT[0], seed=5)
    noisy, baseline = fixed((1, *LATENT), seed=6, low=-2, high=2), fixed((1, *LATENT), seed=7, low=-2, high=2)
    context = denoiser.build_context(None, fixed((1, 64), seed=8), fixed((1, 64), seed=9))  # null EHR token
    scheduler = inference_scheduler(SchedulerConfig())
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    prediction = denoiser(noisy, t, baseline, context)
    previous = scheduler.step(prediction, t, noisy).prev_sample
    return {
        "timesteps": scheduler.timesteps.tolist(),
        "prediction": corner(prediction),
        "prediction_avg": prediction.mean().item(),
        "previous": corner(previous),
        "previous_avg": previous.mean().item(),
    }


def forecast_values() -> dict:
    torch.manual_seed(0)
    model = Forecaster(forecaster_config(scheduler=SchedulerConfig(micro_batch=4))).eval()
    wake_baseline_channels(model.denoiser.unet, LATENT[0], seed=10)
    images = fixed((2, 1, 32, 32), seed=11)
    horizon = torch.tensor([365.0, 730.0])
    plain = model.forecast(images, horizon, ["case-a", "case-b"], num_samples=2, seed=7, steps=3)
    guided = model.forecast(
        images, horizon, ["case-a", "case-b"], num_samples=2, seed=7, steps=3, guidance_scale=2.0, eta=0.5
    )
    return {
        "latent": corner(plain.latents[1, 1]),
        "mean": corner(plain.mean[0]),
        "mean_avg": plain.mean.mean().item(),
        "variance_avg": plain.variance.mean().item(),
        "guided_latent": corner(guided.latents[0, 1]),
        "guided_mean_avg": guided.mean.mean().item(),
    }


@torch.no_grad()
def lpips_values() -> dict:
    torch.manual_seed(0)
    net = LPIPS()  # random VGG16 trunk
    for k in range(5):  # non-negative heads, as trained LPIPS heads are (lpips clamps them)
        head = getattr(net, f"lin{k}").model[1]
        head.weight.copy_(fixed(head.weight.shape, seed=20 + k, low=0.0, high=1.0))
    x, y = fixed((2, 3, 32, 32), seed=12), fixed((2, 3, 32, 32), seed=13)
    grey_x, grey_y = fixed((2, 1, 32, 32), seed=14), fixed((2, 1, 32, 32), seed=15)
    return {"rgb": net(x, y).tolist(), "grey": net(grey_x, grey_y).tolist(), "self": net(x, x).tolist()}


COMPUTE = {
    "vae": vae_values,
    "vae_loss": vae_loss_values,
    "alignment": alignment_values,
    "unet_step": unet_step_values,
    "forecast": forecast_values,
    "lpips": lpips_values,
}


# ----- the pinned numbers (see the module docstring to regenerate) -------------------------

EXPECTED = {
    "vae": {
        "mean": [
            [0.0786517, -0.1994997, -0.2103657],
            [0.0346745, -0.2606094, -0.117463],
            [-0.0514576, -0.2424091, -0.1682973],
        ],
        "mean_avg": -0.1478381,
        "logvar_avg": -5.9979429,
        "decoded": [
            [0.1230657, 0.1450907, 0.1780394],
            [0.0742505, 0.081829, 0.1759253],
            [0.0986881, 0.1004791, 0.2312592],
        ],
        "decoded_avg": 0.0451687,
        "probe_logit": [-0.0587837, 0.0698978],
    },
    "vae_loss": {
        "reconstruction": 0.5418852,
        "kl": 2.5441422,
        "alignment": 0.6349744,
        "perceptual": 0.0,
        "probe": 0.6945057,
        "total": 0.6748357,
    },
    "alignment": {
        "default_temperatures": 1.2915319,
        "tau_f_0.5_tau_z_3": 1.1681951,
        "features_row0": [4.8000002, 3.2, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    },
    "unet_step": {
        "timesteps": [667, 334, 1],
        "prediction": [
            [-0.0994091, 0.4691572, -0.3386758],
            [-0.1838961, 0.1252337, 0.1306104],
            [-0.2437717, 0.3635538, 0.3070619],
        ],
        "prediction_avg": -0.1405371,
        "previous": [
            [0.3014385, -0.0322956, 1.8755958],
            [0.2988464, -1.2312241, -0.6490672],
            [1.3993388, 0.1984386, -0.6211138],
        ],
        "previous_avg": 0.0939243,
    },
    "forecast": {
        "latent": [
            [-0.3142453, -0.598473, -0.0340958],
            [0.0827131, -0.4967771, -0.3720448],
            [-0.2399823, 0.3493551, -0.1881692],
        ],
        "mean": [
            [0.2582641, 0.1201912, 0.1615893],
            [0.2209003, 0.006541, 0.0650395],
            [0.2443001, -0.0694239, -0.0618588],
        ],
        "mean_avg": 0.0357929,
        "variance_avg": 0.0719507,
        "guided_latent": [
            [-1.6811452, -0.2028793, 0.4581367],
            [0.1344211, 0.6607278, -0.0968139],
            [0.5123817, 0.9522256, -0.5031508],
        ],
        "guided_mean_avg": 0.0304784,
    },
    # Computed by the reference lpips 0.1.4 (LPIPS(net="vgg").forward) on the same trunk and
    # heads, grey pairs repeated to RGB; this file's LPIPS agreed to 6e-8. (Regenerating
    # prints ours: if these move, check against lpips before pasting.)
    "lpips": {
        "rgb": [0.6102664, 0.6144333],
        "grey": [0.6190584, 0.6211206],
        "self": [0.0, 0.0],
    },
}


def check(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(
            torch.tensor(got[name], dtype=torch.float64),
            torch.tensor(value, dtype=torch.float64),
            rtol=0,
            atol=TOLERANCE,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("name", list(COMPUTE))
def test_golden_values(name):
    check(COMPUTE[name](), EXPECTED[name])


def import_reference_lpips():
    """The reference `lpips` package, or a skip saying why not. It is not a dev dependency:
    it needs torchvision, whose PyPI Linux wheels are CUDA builds that fail to import with
    the CPU torch of constraints/cpu.txt. The "lpips" golden values above were computed by
    lpips 0.1.4's own LPIPS.forward on the same weights, so CPU runs still check against it."""
    try:
        import lpips
    except Exception as exc:  # ImportError, or torchvision failing to load its operators
        pytest.skip(
            f"reference lpips package not importable ({type(exc).__name__}: {exc}); "
            "it needs an lpips + torchvision install matching this torch"
        )
    return lpips


def test_lpips_matches_the_reference_package(tmp_path):
    """Same weights in both: lpips's shipped (trained) VGG heads file as is, and its random
    VGG16 trunk saved in torchvision's layout, the two files LPIPS.from_files reads."""
    from pathlib import Path

    lpips = import_reference_lpips()
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}
    for name, value in reference.net.state_dict().items():  # sliceK.N.weight -> features.N.weight
        _, index, kind = name.split(".")
        trunk[f"features.{index}.{kind}"] = value
    torch.save(trunk, tmp_path / "vgg16.pth")
    ours = LPIPS.from_files(tmp_path / "vgg16.pth", Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth")
    x, y = fixed((3, 3, 32, 32), seed=30), fixed((3, 3, 32, 32), seed=31)
    with torch.no_grad():
        expected = reference(x, y).flatten()
        torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-6)
        grey_x, grey_y = x[:, :1], y[:, :1]  # ours takes 1 channel as the grey image repeated to RGB
        torch.testing.assert_close(
            ours(grey_x, grey_y),
            reference(grey_x.repeat(1, 3, 1, 1), grey_y.repeat(1, 3, 1, 1)).flatten(),
            rtol=1e-5,
            atol=1e-6,
        )
    assert (expected > 1e-3).all()  # not a vacuous comparison of zeros


def format_expected(values: dict) -> str:
    """`values` as Python source for EXPECTED, rounded to 1e-7 (the tolerance is 1e-4)."""

    def number(value):
        return [number(v) for v in value] if isinstance(value, list) else round(value, 7)

    lines = ["EXPECTED = {"]
    for name, entries in values.items():
        lines.append(f'    "{name}": {{')
        for key, value in entries.items():
            value = number(value)
            if isinstance(value, list) and isinstance(value[0], list) and len(f"{value}") > 80:
                rows = ",\n".join(f"{' ' * (len(key) + 13)}{row}" for row in value)
                lines.append(f'        "{key}": [{rows.lstrip()}],')
            else:
                lines.append(f'        "{key}": {value},')
        lines.append("    },")
    return "\n".join(lines + ["}"])


if __name__ == "__main__":  # print the current values as the source of EXPECTED
    torch.set_num_threads(1)
    print(format_expected({name: compute() for name, compute in COMPUTE.items()}))
