"""Production-sized configs are the same code: checked on the meta device (no memory)
against the published SD1.5 parameter counts, so real SD1.5 weights fit."""

import torch

from cohortcast.config import load_config
from cohortcast.config.presets import sd15_denoiser, sd15_forecaster, sd15_vae
from cohortcast.models.denoiser import build_unet
from cohortcast.models.vae import build_autoencoder

SD15_VAE_PARAMS = 83_653_863  # runwayml/stable-diffusion-v1-5 vae/
SD15_UNET_PARAMS = 859_520_964  # runwayml/stable-diffusion-v1-5 unet/


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_vae_and_unet_have_sd15_shapes():
    with torch.device("meta"):
        vae = build_autoencoder(sd15_vae(in_channels=3, sample_size=512))
        unet = build_unet(sd15_denoiser(), latent_channels=4, sample_size=64)
    assert _count(vae) == SD15_VAE_PARAMS
    # Ours takes 8 input channels (noisy + baseline): conv_in has 4 x 320 x 3 x 3 more weights.
    assert _count(unet) == SD15_UNET_PARAMS + 4 * 320 * 9


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
        torch.testing.assert_close(wide(torch.cat([x, base], 1), 10, encoder_hidden_states=ctx).sample,
                                   four(x, 10, encoder_hidden_states=ctx).sample)


def test_production_preset_round_trips_through_the_config_system():
    cfg = sd15_forecaster(llm_path="/models/medgemma-1.5-4b")
    loaded = load_config(None, [f"model.denoiser.block_out_channels={list(cfg.denoiser.block_out_channels)}",
                                "model.vae.block_out_channels=[128, 256, 512, 512]", "model.vae.norm_num_groups=32"])
    assert loaded.model.denoiser.block_out_channels == cfg.denoiser.block_out_channels
    assert loaded.model.vae.downsample_factor == 8
