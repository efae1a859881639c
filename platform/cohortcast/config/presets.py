"""Model flavours: named whole sets of model sizes, one registry (the torchtitan lesson).

`model.flavor: <name>` in a config picks the flavour whose ForecasterConfig is the base
of the `model` section: dataclass defaults <- flavour <- keys given in the YAML <- `--set`
overrides (any key given explicitly beats the flavour). The flavour is resolved when the
config is loaded: the loaded config holds the flavour's values, not its name, so a config
naming `flavor: sd15` and one spelling out the same numbers are the same model (the same
stage keys, the same saved Forecaster config). Unknown names are a ConfigError listing
the known ones.

- `debug`: the dataclass defaults, tiny (trains on a CPU in seconds): a factor-4 VAE
  (16, 32, 32) with 4 latent channels, a (32, 64) U-Net with context 64, a 64-wide
  temporal transformer. What a config without `model.flavor` gets.
- `sd15`: NAMD App. B: the SD1.5 VAE (4 latent channels, compression 8) and U-Net (320
  base channels, multipliers 1, 2, 4, 4, two res blocks per level, 8 heads,
  cross-attention width 768 so SD1.5's weights load; the 2560-wide MedGemma embedding is
  projected to it), a 768-wide temporal transformer, the LLM conditioner in bfloat16
  (MedGemma 1.5 4B in production), 64 px crops. Weight paths are local folders given in
  YAML, next to the flavour.

A new flavour is one more entry in FLAVORS: a function returning its ForecasterConfig.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from cohortcast.config.loader import ConfigError
from cohortcast.config.models import (
    ConditionerConfig,
    DenoiserConfig,
    ForecasterConfig,
    SchedulerConfig,
    TemporalConfig,
    VAEConfig,
)


def sd15_vae(sample_size: int = 64, **kw) -> VAEConfig:
    return VAEConfig(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        latent_channels=4,
        sample_size=sample_size,
        **kw,
    )


def sd15_denoiser(**kw) -> DenoiserConfig:
    return DenoiserConfig(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=32,
        cross_attention_dim=768,
        **kw,
    )


def sd15_forecaster(crop_size: int = 64, llm_path: str | None = None) -> ForecasterConfig:
    return ForecasterConfig(
        vae=sd15_vae(sample_size=crop_size),
        conditioner=ConditionerConfig(llm_path=llm_path, dtype="bfloat16"),
        temporal=TemporalConfig(d_model=768, date_dim=128, num_layers=4, num_heads=8),
        denoiser=sd15_denoiser(),
        scheduler=SchedulerConfig(),
    )


FLAVORS: dict[str, Callable[[], ForecasterConfig]] = {
    "debug": ForecasterConfig,
    "sd15": sd15_forecaster,
}


def flavor(name: str) -> ForecasterConfig:
    """A fresh ForecasterConfig of the named flavour (ConfigError naming the known ones)."""
    make = FLAVORS.get(name) if isinstance(name, str) else None
    if make is None:
        close = difflib.get_close_matches(str(name), list(FLAVORS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown flavour {name!r}{hint}; known flavours: {sorted(FLAVORS)}")
    return make()
