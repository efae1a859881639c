"""Production-sized model configs: the same classes as the tiny defaults, other sizes.

`sd15_forecaster()` is NAMD App. B: the SD1.5 VAE (4 latent channels, compression 8)
and U-Net (320 base channels, multipliers 1, 2, 4, 4, two res blocks per level, 8
heads, cross-attention width 768 so SD1.5's weights load; the 2560-wide MedGemma
embedding is projected to it), MedGemma 1.5 4B as the frozen conditioner, 1000 DDPM
steps, 50 DDIM steps, 20 samples. Weight paths are local folders given in YAML.
"""

from __future__ import annotations

from cohortcast.config.models import (
    ConditionerConfig, DenoiserConfig, ForecasterConfig, SchedulerConfig, TemporalConfig, VAEConfig,
)


def sd15_vae(sample_size: int = 64, **kw) -> VAEConfig:
    return VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                     latent_channels=4, sample_size=sample_size, **kw)


def sd15_denoiser(**kw) -> DenoiserConfig:
    return DenoiserConfig(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                          norm_num_groups=32, cross_attention_dim=768, **kw)


def sd15_forecaster(crop_size: int = 64, llm_path: str | None = None) -> ForecasterConfig:
    return ForecasterConfig(
        vae=sd15_vae(sample_size=crop_size), conditioner=ConditionerConfig(llm_path=llm_path, dtype="bfloat16"),
        temporal=TemporalConfig(d_model=768, date_dim=128, num_layers=4, num_heads=8),
        denoiser=sd15_denoiser(), scheduler=SchedulerConfig())
