"""Model configs: one small dataclass per component (torchtitan style). The tiny
defaults train on a CPU in seconds; `presets.py` holds the named flavours (`model.flavor`:
`debug`, the defaults; `sd15`, the SD1.5 VAE and U-Net with MedGemma 4B). All are the
same code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cohortcast.config.loader import require as _require


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
    # Diameters enter the alignment features in units of this many mm. At 10 mm the
    # one-hot attributes (distance up to sqrt(6)) outweighed a 5 mm size difference (0.5);
    # at 2.5 mm the same difference counts 2.0, so nodule size shapes the latent space.
    diameter_scale_mm: float = 2.5
    # LPIPS-style perceptual term: VGG16 features (torchvision state-dict layout) and the
    # LPIPS linear heads (lpips package layout). Off, and logged, when not given.
    perceptual_vgg_path: str | None = None
    perceptual_lpips_path: str | None = None

    def validate(self) -> None:
        for name in ("reconstruction", "kl", "perceptual", "alignment", "probe"):
            _require(getattr(self, name) >= 0, name, "loss weights must be >= 0")
        _require(self.tau_f > 0 and self.tau_z > 0, "tau_f", "temperatures must be > 0")
        _require(self.diameter_scale_mm > 0, "diameter_scale_mm", "must be > 0")


@dataclass
class VAEConfig:
    """diffusers AutoencoderKL; the defaults are a tiny 3-level model (compression 4:
    8x8 latents for 32 px crops; 4x4 latents capped reconstruction L1 near 0.057, above
    what copying the baseline scores) for CPU. `pretrained_path` loads a local
    diffusers-format SD1.5 VAE (3-channel) and folds it to `in_channels` exactly (see
    models/vae.py).

    `scaling_factor` None (the default) means: computed after VAE training as 1 / std of
    the training crops' posterior means, so the diffusion latents have unit variance,
    and stored in the trained VAE's vae.json (SD1.5's 0.18215 is right only for SD1.5's
    own weights; a VAE trained here, or SD1.5 fine-tuned with the alignment loss, has
    another scale). A number is used as given.

    `posterior_logvar_init`: initial bias of the posterior log-variance of a VAE built
    from scratch. diffusers starts it near 0 (sigma ~1), and a short CPU run never leaves
    that: the decoder then learns about the average image. -6 (sigma ~0.05) lets
    reconstruction train from the first step; the KL term moves it from there.

    `intensity_range`: decoded images are clamped to it (the ingestion scale)."""

    in_channels: int = 1
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    sample_size: int = 32
    scaling_factor: float | None = None
    posterior_logvar_init: float | None = -6.0
    intensity_range: tuple[float, float] = (-1.0, 1.0)
    pretrained_path: str | None = None
    loss: VAELossConfig = field(default_factory=VAELossConfig)

    def validate(self) -> None:
        _require(self.in_channels in (1, 3), "in_channels", "must be 1 (CT) or 3")
        _require(len(self.block_out_channels) >= 1, "block_out_channels", "needs at least one level")
        _require(
            all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
            "norm_num_groups",
            f"must divide every block_out_channels entry {list(self.block_out_channels)}",
        )
        _require(self.scaling_factor is None or self.scaling_factor > 0, "scaling_factor", "must be > 0 or null")
        _require(self.intensity_range[0] < self.intensity_range[1], "intensity_range", "low must be below high")

    # The latent geometry follows from the sizes above; computed here only, and read by
    # the VAE's probe, the Forecaster, the temporal encoder and the U-Net alike.
    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)  # each level after the first halves the side

    @property
    def latent_side(self) -> int:
        return self.sample_size // self.downsample_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one crop's latent."""
        return (self.latent_channels, self.latent_side, self.latent_side)

    @property
    def latent_numel(self) -> int:
        """Values in one crop's latent (the probe's and the temporal encoder's input width)."""
        return self.latent_channels * self.latent_side**2


@dataclass
class ConditionerConfig:
    """How the EHR reaches the denoiser's EHR context token.

    kind "llm": a frozen causal LM from a local folder (MedGemma 1.5 4B in production)
    with `num_soft_prompts` learnable vectors prepended to its input embeddings (NAMD
    Eq. 7), reading the EHR rendered as a report; `llm_path` None means no EHR
    conditioning (the EHR slot gets its null token).
    kind "structured": the 13 EHR features as numbers and one-hots through a small
    learned projection (`structured_hidden` wide). A randomly initialised tiny LM carries
    no information on CPU; this token does, so the CPU configs use it."""

    kind: Literal["llm", "structured"] = "llm"
    structured_hidden: int = 64
    llm_path: str | None = None
    num_soft_prompts: int = 8
    max_length: int = 128
    # Pad every text to max_length: the pooled vector then never depends on how long
    # the other texts in its batch are (bit-identical forecasts, see scheduler.micro_batch).
    pad_to_max_length: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def validate(self) -> None:
        _require(self.num_soft_prompts >= 1, "num_soft_prompts", "must be >= 1")
        _require(self.structured_hidden >= 1, "structured_hidden", "must be >= 1")
        _require(self.max_length >= 8, "max_length", "must be >= 8")


@dataclass
class TemporalConfig:
    """CLDM temporal transformer over prior exams (Sec. 3): each token is a projected
    prior latent concatenated with a learnable date embedding; a [CLS] token summarises."""

    d_model: int = 64
    date_dim: int = 16
    num_layers: int = 2
    num_heads: int = 4
    max_exams: int = 8
    time_scale_days: float = 365.25

    def validate(self) -> None:
        _require(0 < self.date_dim < self.d_model, "date_dim", "must be in (0, d_model)")
        _require(self.d_model % self.num_heads == 0, "num_heads", "must divide d_model")
        _require(self.max_exams >= 1, "max_exams", "must be >= 1")


@dataclass
class DenoiserConfig:
    """diffusers UNet2DConditionModel. Input: noisy follow-up latent channel-concatenated
    with the baseline latent (2 x latent_channels, NAMD App. B); cross-attention to
    [EHR token, temporal [CLS], target-date embedding]. Defaults are tiny; the SD1.5
    preset is (320, 640, 1280, 1280), 2 layers per block, 8 heads, context 768."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    cross_attention_dim: int = 64
    condition_dropout: float = 0.1
    # "change": the diffusion target is the scaled change (follow-up latent - baseline
    # latent) * change_scale, the baseline still concatenated (as TADM); it trained
    # better than "absolute" follow-up latents. change_scale None = computed before the
    # conditional stage as 1 / std of the training changes (unit variance again).
    target: Literal["change", "absolute"] = "change"
    change_scale: float | None = None
    # Local diffusers-format SD1.5 `unet/` folder (4 input channels): loaded, then conv_in
    # widened to 8 channels with zero weights for the baseline half, so the widened
    # model starts out computing exactly the pretrained one.
    pretrained_path: str | None = None

    def validate(self) -> None:
        _require(len(self.block_out_channels) >= 1, "block_out_channels", "needs at least one level")
        _require(
            all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
            "norm_num_groups",
            "must divide every block_out_channels entry",
        )
        _require(0.0 <= self.condition_dropout < 1.0, "condition_dropout", "must be in [0, 1)")
        _require(self.change_scale is None or self.change_scale > 0, "change_scale", "must be > 0 or null")


SAMPLERS = ("ddim", "dpmsolver++")


@dataclass
class SchedulerConfig:
    """DDPM for training (NAMD App. B: 1000 steps, linear betas 1e-4..0.02), DDIM (NAMD's
    sampler) or DPM-Solver++ (diffusers' 2nd-order multistep solver, `sampler`) for
    inference; both are deterministic given the start noise. NAMD predicts epsilon; trained from scratch at CPU lengths that failed:
    under this schedule x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) amplifies an epsilon
    error ~100x at t ~ 950, and DDIM locked onto it (sampled latents std 12-20 against a
    true 1). v-prediction (Salimans & Ho) has no such amplification: the default here.
    "sample" (x0) is offered too; it trained worse."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    inference_steps: int = 50
    # The default sampler of a model; callers (the service, cohort jobs) may override it
    # per call. "dpmsolver++" reaches DDIM's quality in fewer steps (benchmarks/few_step_sampling.py).
    sampler: Literal["ddim", "dpmsolver++"] = "ddim"
    eta: float = 0.0  # DDIM only: 0 = deterministic DDIM; DPM-Solver++ has no per-step noise
    guidance_scale: float = 1.0
    num_samples: int = 20
    # Every network call at inference runs on exactly this many rows (the last chunk is
    # padded): kernels pick reduction orders by batch size (we measured ~1e-6 drift on
    # CPU between batch sizes 1 and 8), so a fixed size makes each sample bit-identical
    # whatever else shares its batch. Keep it constant across calls; a multiple of
    # num_samples avoids padding.
    micro_batch: int = 20

    def validate(self) -> None:
        _require(0 < self.beta_start < self.beta_end < 1, "beta_start", "need 0 < beta_start < beta_end < 1")
        _require(
            1 <= self.inference_steps <= self.num_train_timesteps,
            "inference_steps",
            "must be in 1..num_train_timesteps",
        )
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(self.sampler in SAMPLERS, "sampler", f"must be one of {', '.join(SAMPLERS)}")
        _require(self.eta == 0 or self.sampler == "ddim", "eta", "eta > 0 is DDIM's; DPM-Solver++ takes no eta")
        _require(self.guidance_scale >= 0, "guidance_scale", "must be >= 0")
        _require(self.micro_batch >= 1, "micro_batch", "must be >= 1")


@dataclass
class ForecasterConfig:
    """`kind` "regression" is the no-diffusion baseline: the same networks and context,
    trained to predict the (scaled) change in one pass from a zero input at the last
    timestep; its N samples are identical (it is deterministic).
    `compose` "baseline_plus_change": the forecast image is the baseline crop plus the
    decoded change (decode(z_forecast) - decode(z_baseline)), which keeps the exam's own
    noise the VAE cannot encode; "decoded": decode(z_forecast) alone.

    A `flavor` key in the mapping it is loaded from names the base its other keys
    override (config/presets.py); it is resolved at load time, not kept as a field."""

    kind: Literal["diffusion", "regression"] = "diffusion"
    compose: Literal["decoded", "baseline_plus_change"] = "decoded"
    vae: VAEConfig = field(default_factory=VAEConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_flavor(cls, name: str) -> ForecasterConfig:
        """The loader's hook for `model.flavor` (see loader.from_dict)."""
        from cohortcast.config.presets import flavor  # presets builds on this module

        return flavor(name)
