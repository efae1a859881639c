"""CLDM configs (the `cldm` section): the universal 2D/3D encoder and the job's training
stages (`cldm.training`: encoder pre-training, study latent cache) now; the temporal
transformer, latent diffusion and the task decoders join them in part 2.

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
from dataclasses import dataclass, field, replace

from cohortcast.config.cldm_evaluation import CLDMEvaluationConfig
from cohortcast.config.cldm_forecast import CLDMForecastJobConfig
from cohortcast.config.cldm_models import CLDMModelsConfig
from cohortcast.config.cldm_stages import (
    DecoderStageConfig,
    DiffusionStageConfig,
    ForecastValidationConfig,
    TinyLMConfig,
    validate_paired_batches,
)
from cohortcast.config.loader import ConfigError
from cohortcast.config.loader import require as _require
from cohortcast.config.training import LatentCacheConfig, StageConfig

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


# ----- CLDM training (the job's stages; jobs/train_cldm.py) -----------------------------

CLDM_STAGES = ("encoder", "study_latents", "segmentation", "report", "diffusion", "regressor")


@dataclass
class EncoderStageConfig(StageConfig):
    """Stage `encoder`: masked-image-modelling pre-training of the universal encoder on
    CT volumes and radiographs together (training/encoder_stage.py). The optimiser,
    schedule, ZeRO stage, precision, checkpoints and logging are StageConfig's.

    Every step takes, per worker, one batch of `micro_batch_3d` volumes and one of
    `micro_batch_2d` radiographs (separate sizes: a volume costs far more than a
    radiograph) and minimises `weight_3d * L3d + weight_2d * L2d`. A micro-batch of 0
    leaves that kind out. `micro_batch_size` is derived (the step's samples, both kinds)
    and must stay 0 here."""

    micro_batch_size: int = 0
    micro_batch_3d: int = 2
    micro_batch_2d: int = 8
    weight_3d: float = 1.0
    weight_2d: float = 1.0

    def validate(self) -> None:
        validate_paired_batches(self)
        _require(min(self.weight_3d, self.weight_2d) >= 0, "weight_3d", "loss weights must be >= 0")
        StageConfig.validate(replace(self, micro_batch_size=self.micro_batch_3d + self.micro_batch_2d))


@dataclass
class EncoderValidationConfig:
    """The encoder stage's validation on the `val` split (world rank 0), every
    `every_epochs` epochs and at the end: the MIM loss per kind on up to `max_rows`
    studies of each, under masks drawn from `seed` (the same every time, so the losses
    compare across steps), and a reconstruction grid per kind (`cases` rows: masked input
    | reconstruction | original; volumes by their middle slice) as PNG artifacts."""

    every_epochs: int = 1
    max_rows: int = 32
    cases: int = 3
    seed: int = 0

    def validate(self) -> None:
        _require(self.every_epochs >= 1, "every_epochs", "must be >= 1")
        _require(self.max_rows >= 1 and self.cases >= 1, "max_rows", "max_rows and cases must be >= 1")


@dataclass
class CLDMTrainingConfig:
    """The CLDM job's stages in order: `encoder`, `study_latents` (part 1), then
    `segmentation`, `report`, `diffusion`, `regressor` (part 2, config/cldm_stages.py),
    each skipped when its output is valid. Ray Train workers, GPUs and checkpoint storage:
    `training.scaling`, shared with the NAMD job. `stages` limits what trains; a stage
    left out must already have an output (as `training.stages`)."""

    output: str = "runs/cldm/train"
    stages: tuple[str, ...] = CLDM_STAGES
    encoder: EncoderStageConfig = field(default_factory=lambda: EncoderStageConfig(max_steps=20, lr=1e-3))
    validation: EncoderValidationConfig = field(default_factory=EncoderValidationConfig)
    latent_cache: LatentCacheConfig = field(
        default_factory=lambda: LatentCacheConfig(root="runs/cldm/latents", actors=1, batch_size=16)
    )
    segmentation: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    report: DecoderStageConfig = field(default_factory=DecoderStageConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)
    regressor: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)
    forecast_validation: ForecastValidationConfig = field(default_factory=ForecastValidationConfig)
    tiny_lm: TinyLMConfig = field(default_factory=TinyLMConfig)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in CLDM_STAGES]
        _require(not unknown, "stages", f"unknown stage(s) {unknown}; choose from {list(CLDM_STAGES)}")


@dataclass
class CLDMConfig:
    """The CLDM model (paper Sec. 3): the universal encoder, the forecaster and decoders
    over its study tokens (`models`, config/cldm_models.py; its token grids must be the
    encoder's: see wired_models), the job's training stages (`training`), its evaluation
    and its cohort forecasting job (`forecast`)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    models: CLDMModelsConfig = field(default_factory=CLDMModelsConfig)
    training: CLDMTrainingConfig = field(default_factory=CLDMTrainingConfig)
    evaluation: CLDMEvaluationConfig = field(default_factory=CLDMEvaluationConfig)
    forecast: CLDMForecastJobConfig = field(default_factory=CLDMForecastJobConfig)


def wired_models(cldm: CLDMConfig) -> CLDMModelsConfig:
    """`cldm.models` with its token latent taken from the encoder that writes the tokens
    (dim, patches, and grids = the encoder's input sizes / patches), validated: the job,
    the evaluation and serving build every CLDM model from this, so `models.latent`'s
    sizes in a config file are not used (only its `dims`)."""
    import copy

    enc = cldm.encoder
    models = copy.deepcopy(cldm.models)
    lat = models.latent
    lat.dim = enc.dim
    lat.patch_2d, lat.patch_3d = tuple(enc.patch_2d), tuple(enc.patch_3d)
    lat.grid_2d = tuple(s // p for s, p in zip(enc.image_2d, enc.patch_2d))
    lat.grid_3d = tuple(s // p for s, p in zip(enc.volume_3d, enc.patch_3d))
    try:
        models.validate()
    except ConfigError as exc:
        raise ConfigError(f"cldm.models (token sizes from cldm.encoder): {exc}") from None
    return models
