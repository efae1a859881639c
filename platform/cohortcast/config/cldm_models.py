"""CLDM model configs (issue 16): the token diffusion forecaster, its no-diffusion
regressor, and the segmentation and report decoders. Dataclasses only; one code path for
the CPU `debug` flavour and the paper-sized `paper` flavour (as config/presets.py does for
NAMD): `CLDMModelsConfig.from_flavor(name)` is the loader's hook for a `flavor:` key.

- `debug`: the dataclass defaults. Study latents as the cldm_debug encoder writes them:
  dim 64, radiographs 64 x 64 in 8 x 8 patches (8 x 8 = 64 tokens), CT 32 x 64 x 64 in
  4 x 8 x 8 patches (8 x 8 x 8 = 512 tokens). A 4-layer 64-wide temporal transformer, a
  4-block 128-wide token denoiser over 2 x 2 x 2 (CT) / 2 x 2 (radiograph) token groups,
  a 3-stage transposed-conv segmentation decoder, 4 prefix vectors for the report LM.
- `paper`: CLDM Sec. 3 sizes: d = 768 (UniMiSS), the `unimiss` encoder flavour's grids
  (224 x 224 radiographs in 16 x 16 patches: 14 x 14 tokens; 64 x 224 x 224 CT in
  8 x 16 x 16 patches: 8 x 14 x 14 tokens), a 4-layer temporal transformer, a DiT-B-sized
  denoiser (768 wide, 12 blocks, 12 heads; 2 x 2 x 2 CT groups and 1 x 1 radiograph
  groups, so both sequences are 196 + 1 long), a 4-stage segmentation decoder, 8 prefix
  vectors into a local BioGPT (`report.lm_path`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cohortcast.config.loader import ConfigError
from cohortcast.config.loader import require as _require
from cohortcast.config.models import SchedulerConfig, TemporalConfig


@dataclass
class TokenLatentConfig:
    """What one study latent is: the universal encoder's (1 + N, dim) tokens, [CLS] first,
    then the patch tokens row-major over the patch grid. The grids are the encoder's
    input sizes divided by its patches (image_2d / patch_2d, volume_3d / patch_3d); the
    lead wires them from `cldm.encoder`. `dims`: which study kinds the models serve (2:
    radiographs, 3: CT volumes); the denoiser builds an input/output projection for each,
    and tells them apart by token count, so the two grids must differ in size."""

    dim: int = 64
    grid_2d: tuple[int, int] = (8, 8)
    grid_3d: tuple[int, int, int] = (8, 8, 8)
    patch_2d: tuple[int, int] = (8, 8)
    patch_3d: tuple[int, int, int] = (4, 8, 8)
    dims: tuple[int, ...] = (2, 3)

    def validate(self) -> None:
        _require(self.dim >= 1, "dim", "must be >= 1")
        _require(
            len(self.dims) >= 1 and set(self.dims) <= {2, 3}, "dims", f"must be a subset of (2, 3), got {self.dims}"
        )
        _require(len(set(self.dims)) == len(self.dims), "dims", "lists a study kind twice")
        for name, grid, n in (("grid_2d", self.grid_2d, 2), ("grid_3d", self.grid_3d, 3)):
            _require(len(grid) == n and all(g >= 1 for g in grid), name, f"needs {n} sizes >= 1")
        for name, patch, n in (("patch_2d", self.patch_2d, 2), ("patch_3d", self.patch_3d, 3)):
            _require(len(patch) == n and all(p >= 1 for p in patch), name, f"needs {n} sizes >= 1")
        _require(
            len(self.dims) < 2 or self.num_tokens(2) != self.num_tokens(3),
            "grid_2d",
            "2D and 3D grids have the same token count; serve one kind per model (dims)",
        )

    def grid(self, dims: int) -> tuple[int, ...]:
        return tuple(self.grid_2d if dims == 2 else self.grid_3d)

    def patch(self, dims: int) -> tuple[int, ...]:
        return tuple(self.patch_2d if dims == 2 else self.patch_3d)

    def num_tokens(self, dims: int) -> int:
        """Patch tokens N (without [CLS])."""
        return math.prod(self.grid(dims))

    def image_shape(self, dims: int) -> tuple[int, ...]:
        """The study grid the tokens came from: (H, W) or (D, H, W)."""
        return tuple(g * p for g, p in zip(self.grid(dims), self.patch(dims)))

    def dims_of(self, num_patch_tokens: int) -> int:
        """2 or 3 from a token count (ValueError for a count no served grid has)."""
        for dims in self.dims:
            if self.num_tokens(dims) == num_patch_tokens:
                return dims
        known = {d: self.num_tokens(d) for d in self.dims}
        raise ValueError(f"{num_patch_tokens} patch tokens fit no served grid (tokens per dims: {known})")


@dataclass
class TokenDenoiserConfig:
    """The transformer denoiser over study tokens (models/token_denoiser.py), DiT-style.

    Its input is the noisy target tokens concatenated feature-wise with the last prior's
    tokens (the baseline); neighbouring patch tokens are grouped `group_2d` / `group_3d`
    (DiT's "patch size" on the latent grid: 2 x 2 x 2 makes 512 CT tokens 64 sequence
    positions) and projected to `width`; the [CLS] token is one more position. Timesteps
    enter by adaLN-Zero (DiT), the context [temporal summary, target date(, last prior's
    pooled tokens)] by cross-attention, each slot with a learned null token for
    classifier-free guidance (`condition_dropout`: the share of training rows on nulls).

    `target`: what is diffused. "change": (target tokens - last prior's tokens) *
    target_scale (the NAMD path's better-training choice: the model starts from
    "nothing changes"); "absolute": target tokens * target_scale. `target_scale_2d/3d`
    None = computed before training as 1 / std of the training targets (unit variance,
    as latent diffusion wants) and saved with the model."""

    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    group_2d: tuple[int, int] = (2, 2)
    group_3d: tuple[int, int, int] = (2, 2, 2)
    prior_in_context: bool = False
    condition_dropout: float = 0.1
    target: Literal["change", "absolute"] = "change"
    target_scale_2d: float | None = None
    target_scale_3d: float | None = None

    def validate(self) -> None:
        _require(self.width >= 8 and self.width % self.heads == 0, "heads", f"must divide width {self.width}")
        _require(self.depth >= 1, "depth", "must be >= 1")
        _require(self.mlp_ratio > 0, "mlp_ratio", "must be > 0")
        _require(len(self.group_2d) == 2 and all(g >= 1 for g in self.group_2d), "group_2d", "needs 2 sizes >= 1")
        _require(len(self.group_3d) == 3 and all(g >= 1 for g in self.group_3d), "group_3d", "needs 3 sizes >= 1")
        _require(0.0 <= self.condition_dropout < 1.0, "condition_dropout", "must be in [0, 1)")
        for name in ("target_scale_2d", "target_scale_3d"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, "must be > 0 or null")

    def group(self, dims: int) -> tuple[int, ...]:
        return tuple(self.group_2d if dims == 2 else self.group_3d)


def upsample_strides(patch: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-stage strides that multiply up to `patch` on every axis: a factor 2 per stage
    while an axis has one, its odd remainder in one stage, 1 once it is done. (4, 8, 8) ->
    [(2, 2, 2), (2, 2, 2), (1, 2, 2)]."""
    remaining, stages = list(patch), []
    while any(r > 1 for r in remaining):
        stride = tuple(1 if r == 1 else 2 if r % 2 == 0 else r for r in remaining)
        remaining = [r // s for r, s in zip(remaining, stride)]
        stages.append(stride)
    return stages


@dataclass
class SegmentationDecoderConfig:
    """Tokens of a CT study -> ILD mask logits on the study grid (models/segmentation_decoder.py):
    the patch tokens as a feature volume on the token grid, then one transposed-conv stage
    per factor 2 of the patch (per axis; an odd factor in one stage), `channels[i]` wide,
    each followed by a 3x3x3 conv; loss Dice + BCE (MONAI DiceCELoss)."""

    channels: tuple[int, ...] = (32, 16, 8)
    dice_weight: float = 1.0
    ce_weight: float = 1.0

    def validate(self) -> None:
        _require(len(self.channels) >= 1 and all(c >= 1 for c in self.channels), "channels", "needs sizes >= 1")
        _require(self.dice_weight >= 0 and self.ce_weight >= 0, "dice_weight", "loss weights must be >= 0")
        _require(self.dice_weight + self.ce_weight > 0, "dice_weight", "one loss weight must be > 0")


@dataclass
class ReportDecoderConfig:
    """A causal LM (GPT-2 architecture in tests, a local BioGPT-style model in production,
    `lm_path`: a Hugging Face folder, never the hub) conditioned by `num_prefix` vectors
    attention-pooled from a study's tokens (models/report_decoder.py); with `use_prior`,
    from the study's and the previous exam's tokens together (each marked by a learned
    type embedding; a learned "no prior" token stands in where there is none or it is
    dropped), so the LM can state change against the prior. `max_length`: report
    tokens kept for training; `max_new_tokens` / `num_beams`: generation (greedy when 1)."""

    lm_path: str | None = None
    use_prior: bool = True
    num_prefix: int = 4
    pool_heads: int = 4
    max_length: int = 128
    max_new_tokens: int = 128
    num_beams: int = 1
    freeze_lm: bool = False

    def validate(self) -> None:
        _require(self.num_prefix >= 1, "num_prefix", "must be >= 1")
        _require(self.pool_heads >= 1, "pool_heads", "must be >= 1")
        _require(self.max_length >= 4 and self.max_new_tokens >= 1, "max_length", "lengths must be >= 4 / >= 1")
        _require(self.num_beams >= 1, "num_beams", "must be >= 1")


@dataclass
class CLDMModelsConfig:
    """All CLDM model sizes together. `prior_summary`: what represents a prior study in the
    temporal transformer: "cls" the encoder's [CLS] (the paper's z_d, a d-vector), or
    "cls_mean" [CLS] concatenated with the mean patch token (MAE-style pre-training trains
    the patch tokens, not the [CLS], directly), or "pooled" a learned attention pool over
    each prior's tokens (models/cldm_forecaster.PriorPool). A `flavor` key names the base the other
    keys override (see the module docstring)."""

    latent: TokenLatentConfig = field(default_factory=TokenLatentConfig)
    prior_summary: Literal["cls", "cls_mean", "pooled"] = "cls"
    temporal: TemporalConfig = field(default_factory=lambda: TemporalConfig(num_layers=4))
    denoiser: TokenDenoiserConfig = field(default_factory=TokenDenoiserConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    segmentation: SegmentationDecoderConfig = field(default_factory=SegmentationDecoderConfig)
    report: ReportDecoderConfig = field(default_factory=ReportDecoderConfig)

    def validate(self) -> None:
        # The sections validate themselves when loaded from YAML; again here for configs
        # built in code (the models call this).
        for section in (self.latent, self.temporal, self.denoiser, self.scheduler, self.segmentation, self.report):
            section.validate()
        _require(
            self.latent.dim % self.report.pool_heads == 0,
            "report.pool_heads",
            f"must divide the token width latent.dim = {self.latent.dim}",
        )
        stages = len(upsample_strides(self.latent.patch_3d))
        _require(
            len(self.segmentation.channels) == stages,
            "segmentation.channels",
            f"needs one width per upsampling stage: {stages} for patch_3d {list(self.latent.patch_3d)}",
        )
        for dims in self.latent.dims:
            grid, group = self.latent.grid(dims), self.denoiser.group(dims)
            _require(
                all(g % k == 0 for g, k in zip(grid, group)),
                f"denoiser.group_{dims}d",
                f"{list(group)} must divide the token grid {list(grid)}",
            )

    @classmethod
    def from_flavor(cls, name: str) -> CLDMModelsConfig:
        return cldm_models_flavor(name)


def paper_models() -> CLDMModelsConfig:
    return CLDMModelsConfig(
        latent=TokenLatentConfig(
            dim=768, grid_2d=(14, 14), grid_3d=(8, 14, 14), patch_2d=(16, 16), patch_3d=(8, 16, 16)
        ),
        temporal=TemporalConfig(d_model=768, date_dim=128, num_layers=4, num_heads=12, max_exams=32),
        denoiser=TokenDenoiserConfig(width=768, depth=12, heads=12, group_2d=(1, 1), group_3d=(2, 2, 2)),
        scheduler=SchedulerConfig(),
        segmentation=SegmentationDecoderConfig(channels=(256, 128, 64, 32)),
        report=ReportDecoderConfig(num_prefix=8, pool_heads=12, max_length=256, max_new_tokens=256),
    )


CLDM_MODEL_FLAVORS: dict[str, Callable[[], CLDMModelsConfig]] = {
    "debug": CLDMModelsConfig,
    "paper": paper_models,
}


def cldm_models_flavor(name: str) -> CLDMModelsConfig:
    """A fresh CLDMModelsConfig of the named flavour (ConfigError naming the known ones)."""
    make = CLDM_MODEL_FLAVORS.get(name) if isinstance(name, str) else None
    if make is None:
        close = difflib.get_close_matches(str(name), list(CLDM_MODEL_FLAVORS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown flavour {name!r}{hint}; known flavours: {sorted(CLDM_MODEL_FLAVORS)}")
    cfg = make()
    cfg.validate()
    return cfg
