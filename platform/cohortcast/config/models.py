"""Model configs: one small dataclass per component (torchtitan style). The tiny
defaults train on a CPU in seconds; `presets.py` holds the production sizes (SD1.5 VAE
and U-Net, MedGemma 4B). Both are the same code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cohortcast.config.loader import ConfigError


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


@dataclass
class VAELossConfig:
    """NAMD Eq. 6 weights and the alignment temperatures of Eq. 2."""

    reconstruction: float = 1.0
    kl: float = 1e-6
    perceptual: float = 0.1
    alignment: float = 0.1
    probe: float = 0.1
    tau_f: float = 1.0
    tau_z: float = 1.0
    # LPIPS-style perceptual term: VGG16 features (torchvision state-dict layout) and the
    # LPIPS linear heads (lpips package layout). Off, and logged, when not given.
    perceptual_vgg_path: str | None = None
    perceptual_lpips_path: str | None = None

    def validate(self) -> None:
        for name in ("reconstruction", "kl", "perceptual", "alignment", "probe"):
            _require(getattr(self, name) >= 0, name, "loss weights must be >= 0")
        _require(self.tau_f > 0 and self.tau_z > 0, "tau_f", "temperatures must be > 0")


@dataclass
class VAEConfig:
    """diffusers AutoencoderKL; the defaults are a tiny 4-level model (compression 8,
    like SD1.5) for CPU. `pretrained_path` loads a local diffusers-format SD1.5 VAE
    (3-channel) and folds it to `in_channels` exactly (see models/vae.py)."""

    in_channels: int = 1
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    sample_size: int = 32
    scaling_factor: float = 0.18215
    pretrained_path: str | None = None
    loss: VAELossConfig = field(default_factory=VAELossConfig)

    def validate(self) -> None:
        _require(self.in_channels in (1, 3), "in_channels", "must be 1 (CT) or 3")
        _require(len(self.block_out_channels) >= 1, "block_out_channels", "needs at least one level")
        _require(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "norm_num_groups",
                 f"must divide every block_out_channels entry {list(self.block_out_channels)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class ConditionerConfig:
    """Frozen causal LM from a local folder (MedGemma 1.5 4B in production) with
    `num_soft_prompts` learnable vectors prepended to its input embeddings (NAMD Eq. 7).
    `llm_path` None means no EHR conditioning (the EHR slot gets its null token)."""

    llm_path: str | None = None
    num_soft_prompts: int = 8
    max_length: int = 128
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> None:
        _require(self.num_soft_prompts >= 1, "num_soft_prompts", "must be >= 1")
        _require(self.max_length >= 8, "max_length", "must be >= 8")
