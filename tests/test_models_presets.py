"""Model flavours are the same code at other sizes: the `sd15` flavour (what
jobs/configs/namd_nlst.yaml names) is checked on the meta device (no memory, under a
second) against SD1.5's published sizes and parameter counts, so real SD1.5 weights fit."""

from dataclasses import replace
from pathlib import Path

import torch

from cohortcast.config import load_config
from cohortcast.config.presets import flavor
from cohortcast.models.denoiser import build_unet
from cohortcast.models.vae import build_autoencoder

ROOT = Path(__file__).resolve().parents[1]
SD15_VAE_PARAMS = 83_653_863  # runwayml/stable-diffusion-v1-5 vae/
SD15_UNET_PARAMS = 859_520_964  # runwayml/stable-diffusion-v1-5 unet/


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_the_nlst_config_builds_sd15_sized_models():
    model = load_config(ROOT / "jobs" / "configs" / "namd_nlst.yaml").model
    v, d = model.vae, model.denoiser
    assert (v.block_out_channels, v.layers_per_block, v.norm_num_groups, v.latent_channels) == (
        (128, 256, 512, 512),
        2,
        32,
        4,
    )
    assert (
        d.block_out_channels,
        d.layers_per_block,
        d.attention_head_dim,
        d.norm_num_groups,
        d.cross_attention_dim,
    ) == ((320, 640, 1280, 1280), 2, 8, 32, 768)
    assert v.downsample_factor == 8 and v.latent_shape == (4, 8, 8)  # 64 px crops
    assert (model.temporal.d_model, model.temporal.num_layers, model.conditioner.dtype) == (768, 4, "bfloat16")
    with torch.device("meta"):  # the local weight folders are not read here
        vae = build_autoencoder(replace(v, in_channels=3, pretrained_path=None))  # SD1.5 VAE is RGB
        unet = build_unet(replace(model.denoiser, pretrained_path=None), v.latent_channels, v.latent_side)
    assert _count(vae) == SD15_VAE_PARAMS
    # Ours takes 8 input channels (noisy + baseline): conv_in has 4 x 320 x 3 x 3 more weights.
    assert _count(unet) == SD15_UNET_PARAMS + 4 * 320 * 9


def test_debug_is_the_defaults_and_latent_geometry_follows_the_sizes():
    from cohortcast.config.models import ForecasterConfig

    assert flavor("debug") == ForecasterConfig()
    debug, sd15 = flavor("debug").vae, flavor("sd15").vae
    assert (debug.downsample_factor, debug.latent_shape, debug.latent_numel) == (4, (4, 8, 8), 256)
    assert (sd15.downsample_factor, replace(sd15, sample_size=512).latent_shape) == (8, (4, 64, 64))


def test_models_read_the_latent_geometry_from_the_config():
    from conftest import forecaster_config

    from cohortcast.models.forecaster import Forecaster

    cfg = forecaster_config()
    cfg.vae.sample_size = 16  # 4 x 4 latents at the tiny VAE's factor 4
    model = Forecaster(cfg)
    assert model.latent_shape == cfg.vae.latent_shape == (4, 4, 4)
    assert model.vae.probe.in_features == model.temporal.latent_proj.in_features == cfg.vae.latent_numel == 64


def test_widened_unet_computes_the_pretrained_function(tmp_path):
    torch.manual_seed(0)
    from cohortcast.config.models import DenoiserConfig
    from cohortcast.models.denoiser import load_pretrained_unet

    cfg = DenoiserConfig(block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24)
    four = build_unet(cfg, latent_channels=4, sample_size=8)
    four.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)  # a 4-channel "SD1.5-like" original
    four.register_to_config(in_channels=4)
    four.save_pretrained(tmp_path / "unet")
    wide = load_pretrained_unet(tmp_path / "unet", latent_channels=4)
    assert wide.conv_in.in_channels == 8 and wide.config.in_channels == 8
    x, base, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            wide(torch.cat([x, base], 1), 10, encoder_hidden_states=ctx).sample,
            four(x, 10, encoder_hidden_states=ctx).sample,
        )
