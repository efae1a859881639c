"""CLDM configs (the `cldm` section): the universal 2D/3D encoder now; the temporal
transformer, latent diffusion and the task decoders join it in part 2.

Flavours as for `model` (config/presets.py): `cldm.encoder.flavor: <name>` picks the base
the section's other keys override, resolved when the config is loaded (the loaded config
holds the values, not the name):

- `debug`: the dataclass defaults, CPU-sized (dim 64, depth 2, 4 heads; 64 x 64 images
  in 8 x 8 patches, 16 x 32 x 32 volumes in 4 x 8 x 8 patches; a 1-block, 32-wide MIM
  decoder).
- `unimiss`: the CLDM paper's d = 768 (ViT-B: depth 12, 12 heads, MLP ratio 4); 224 x 224
  radiographs (UniMiSS's 2D size) and 64 x 224 x 224 CT volumes, both in 16 px in-plane
  patches so their in-plane token grids agree (14 x 14); MAE's decoder (512 wide, 8
  blocks, 16 heads).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from cohortcast.config.loader import ConfigError
from cohortcast.config.loader import require as _require

# Fields that decide the weights' shapes or what they compute. Input sizes, the mask ratio
# and the loss normalisation do not (positional embeddings are fixed sin-cos, computed for
# whatever grid comes in), so weights move freely between configs differing only in those.
ARCHITECTURE_FIELDS = (
    "dim",
    "depth",
    "heads",
    "mlp_ratio",
    "patch_2d",
    "patch_3d",
    "decoder_dim",
    "decoder_depth",
    "decoder_heads",
)


@dataclass
class EncoderConfig:
    """Universal 2D/3D encoder (models/universal_encoder.py): one ViT whose blocks are
    shared by a 2D patch embedding (radiographs) and a 3D one (CT volumes), pre-trained by
    masked-image modelling (MAE).

    `image_2d` (H, W) and `volume_3d` (D, H, W) are the sizes the pre-training stage and
    the study latent cache feed; the encoder itself takes any size that is a multiple of
    the patch (fixed sin-cos positions). `norm_pix_loss`: MIM targets are each patch's
    pixels normalised by the patch's own mean and std (MAE's better-performing choice).
    `pretrained_path`: local weights, a folder written by UniversalEncoder.save() or a
    state-dict file (.safetensors, .pt); keys and shapes must match exactly.

    A `flavor` key in the mapping it is loaded from names the base its other keys
    override (see the module docstring); it is not kept as a field."""

    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_2d: tuple[int, int] = (8, 8)
    patch_3d: tuple[int, int, int] = (4, 8, 8)
    image_2d: tuple[int, int] = (64, 64)
    volume_3d: tuple[int, int, int] = (16, 32, 32)
    mask_ratio: float = 0.75
    decoder_dim: int = 32
    decoder_depth: int = 1
    decoder_heads: int = 4
    norm_pix_loss: bool = True
    pretrained_path: str | None = None

    def validate(self) -> None:
        for name, width, heads in (
            ("dim", self.dim, self.heads),
            ("decoder_dim", self.decoder_dim, self.decoder_heads),
        ):
            # sin-cos positions split the width into one even share per axis (3 for volumes)
            _require(width >= 12 and width % 2 == 0, name, f"must be an even number >= 12, got {width}")
            _require(heads >= 1 and width % heads == 0, name, f"{width} is not divisible by {heads} heads")
        _require(self.depth >= 1 and self.decoder_depth >= 1, "depth", "depth and decoder_depth must be >= 1")
        _require(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        _require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        for name, patch, size in (
            ("image_2d", self.patch_2d, self.image_2d),
            ("volume_3d", self.patch_3d, self.volume_3d),
        ):
            _require(all(p >= 1 for p in patch), name, f"patch sizes must be >= 1, got {list(patch)}")
            _require(
                all(s >= p and s % p == 0 for s, p in zip(size, patch)),
                name,
                f"{list(size)} must be a multiple of the patch {list(patch)} on every axis",
            )

    @classmethod
    def from_flavor(cls, name: str) -> EncoderConfig:
        """The loader's hook for `cldm.encoder.flavor` (see loader.from_dict)."""
        return encoder_flavor(name)


def unimiss_encoder(**kw) -> EncoderConfig:
    return EncoderConfig(
        dim=768,
        depth=12,
        heads=12,
        mlp_ratio=4.0,
        patch_2d=(16, 16),
        patch_3d=(8, 16, 16),
        image_2d=(224, 224),
        volume_3d=(64, 224, 224),
        decoder_dim=512,
        decoder_depth=8,
        decoder_heads=16,
        **kw,
    )


ENCODER_FLAVORS: dict[str, Callable[[], EncoderConfig]] = {
    "debug": EncoderConfig,
    "unimiss": unimiss_encoder,
}


def encoder_flavor(name: str) -> EncoderConfig:
    """A fresh EncoderConfig of the named flavour (ConfigError naming the known ones)."""
    make = ENCODER_FLAVORS.get(name) if isinstance(name, str) else None
    if make is None:
        close = difflib.get_close_matches(str(name), list(ENCODER_FLAVORS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown flavour {name!r}{hint}; known flavours: {sorted(ENCODER_FLAVORS)}")
    return make()


@dataclass
class CLDMConfig:
    """The CLDM model (paper Sec. 3). Part 1: the universal encoder."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
