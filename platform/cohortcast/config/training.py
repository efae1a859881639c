"""Training configs: how a stage runs on Ray Train + DeepSpeed (not what it trains)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cohortcast.config.loader import require as _require
from cohortcast.config.models import SAMPLERS


@dataclass
class StageConfig:
    """One training stage (VAE fine-tune, LDM unconditional, LDM conditional).

    Optimiser and schedule follow NAMD App. B: AdamW, linear warmup from
    `lr * warmup_min_ratio` to `lr` over `warmup_steps`, cosine decay to `lr * min_lr_ratio`
    at `max_steps`, gradient clipping 1.0. `micro_batch_size` is per worker; the global
    batch is micro_batch_size x grad_accumulation x workers.
    """

    max_steps: int = 20
    micro_batch_size: int = 8
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 2
    warmup_min_ratio: float = 0.01
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    # "auto": bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 23
    log_every: int = 1
    checkpoint_every: int = 10

    def validate(self) -> None:
        _require(self.max_steps >= 1, "max_steps", "must be >= 1")
        _require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _require(self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(0 <= self.warmup_steps < self.max_steps, "warmup_steps", "must be in [0, max_steps)")
        _require(0 < self.min_lr_ratio <= 1 and 0 < self.warmup_min_ratio <= 1, "min_lr_ratio", "must be in (0, 1]")
        _require(self.grad_clip > 0, "grad_clip", "must be > 0")
        _require(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every", "must be >= 1")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ScalingSettings:
    """Ray Train workers and where runs (checkpoints, results) are stored.

    `storage_path`: a folder every node sees (NFS, FSx, ...) or a URI pyarrow reads
    (`s3://bucket/prefix`, `gs://...`), passed to Ray Train unchanged; on a multi-node
    cluster a node-local folder loses the checkpoints of a node that goes away.
    `placement_strategy`: the Ray placement group strategy of a stage's workers: "PACK"
    (default: as few nodes as possible), "SPREAD" (one worker per node where it can,
    a node lost takes one worker with it), "STRICT_PACK" (all on one node, or wait),
    "STRICT_SPREAD" (each on its own node, or wait)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "runs/demo/ray_results"
    max_failures: int = 1
    checkpoints_to_keep: int = 2
    # CPUs of the cluster left free for Ray Data while a stage trains: the training data
    # streams from read/decode tasks running in them (training/data_streaming.py).
    data_cpus: float = 0.5
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self) -> None:
        _require(self.num_workers >= 1, "num_workers", "must be >= 1")
        _require(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "placement_strategy",
            f"must be one of {', '.join(PLACEMENT_STRATEGIES)}",
        )
        _require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = retry forever)")
        _require(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")
        _require(self.data_cpus >= 0, "data_cpus", "must be >= 0")


@dataclass
class LatentCacheConfig:
    """Stage b: the frozen VAE encodes every crop on a Ray Data actor pool."""

    root: str = "runs/demo/latents"
    actors: int = 2
    batch_size: int = 64

    def validate(self) -> None:
        _require(self.actors >= 1, "actors", "must be >= 1")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class ValidationConfig:
    """Validation on the `val` split, on world rank 0, every `every_epochs` epochs and at
    the end of a stage: losses on up to `max_rows` rows, and for the conditional stage
    `cases` forecasts with `samples` DDIM samples of `inference_steps` steps each, shown as
    PNG grids (baseline | samples | real follow-up)."""

    every_epochs: int = 1
    max_rows: int = 64
    cases: int = 4
    samples: int = 2
    inference_steps: int = 10
    seed: int = 0

    def validate(self) -> None:
        _require(self.every_epochs >= 1, "every_epochs", "must be >= 1")
        _require(self.cases >= 1 and self.samples >= 1, "cases", "cases and samples must be >= 1")
        _require(self.inference_steps >= 1, "inference_steps", "must be >= 1")


STAGES = ("vae", "latents", "ldm_uncond", "ldm_cond", "regressor")
# "regressor" (the no-diffusion baseline) is trained on request: the evaluation job adds
# it when evaluation.regressor is on.
DEFAULT_STAGES = STAGES[:4]


@dataclass
class TrainingConfig:
    """The NAMD job (jobs/train_namd.py): stages a-d, each skipped when its output exists.

    `task_loss` is CLDM Eq. 1's L_task, weighted by `task_weight` (lambda): "probe_bce"
    (the VAE probe's malignancy BCE on the predicted clean latent), "decoded_l1" (L1 of
    the decoded prediction against the real follow-up) or "none" (lambda ignored)."""

    output: str = "runs/demo/train"
    stages: tuple[str, ...] = DEFAULT_STAGES
    vae: StageConfig = field(default_factory=lambda: StageConfig(max_steps=20, lr=1e-4))
    ldm_uncond: StageConfig = field(default_factory=lambda: StageConfig(max_steps=20, lr=1e-4))
    ldm_cond: StageConfig = field(default_factory=lambda: StageConfig(max_steps=20, lr=1e-4))
    regressor: StageConfig = field(default_factory=lambda: StageConfig(max_steps=20, lr=1e-4))
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    latent_cache: LatentCacheConfig = field(default_factory=LatentCacheConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    task_loss: Literal["probe_bce", "decoded_l1", "none"] = "probe_bce"
    task_weight: float = 1.0
    # Debug/CI only: write a tiny randomly initialised Gemma 3 at model.conditioner.llm_path
    # when nothing is there (no model hub here). Production configs point at MedGemma.
    tiny_llm_if_missing: bool = False

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        _require(not unknown, "stages", f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        _require(self.task_weight >= 0, "task_weight", "must be >= 0")


@dataclass
class MLflowConfig:
    """Where runs go. MLFLOW_TRACKING_URI (environment) wins over `tracking_uri`; with
    neither, a local store under the working directory: `<workdir>/mlruns` (SQLite
    backend + artifact folder). `registry_name` registers the final Forecaster;
    `registry_alias` (e.g. "champion", what cluster/rayservice-forecast.yaml serves) then
    points at the version just registered."""

    enabled: bool = True
    experiment: str = "cohortcast-namd"
    tracking_uri: str | None = None
    registry_name: str | None = None
    registry_alias: str | None = None

    def validate(self) -> None:
        _require(
            self.registry_alias is None or bool(self.registry_name),
            "registry_alias",
            "needs mlflow.registry_name (an alias names a registered model's version)",
        )


@dataclass
class ForecastJobConfig:
    """Cohort forecasting (jobs/forecast_cohort.py): every (patient, nodule) of `split`
    with a follow-up, forecast from its first exam to its first follow-up's date (NAMD's
    T0 -> T1), `num_samples` seeded samples each, by `sampler` ("ddim" | "dpmsolver++";
    None: the Forecaster's scheduler config) in `inference_steps` steps."""

    forecaster: str = "runs/demo/train/ldm_cond"
    ingested: str = "runs/demo/ingested"
    split: str = "test"
    output: str = "runs/demo/forecasts"
    num_samples: int = 20
    inference_steps: int = 50
    sampler: str | None = None  # None: the Forecaster's scheduler config
    seed: int = 0
    guidance_scale: float | None = None  # None: the Forecaster's scheduler config
    actors: int = 1
    cases_per_batch: int = 4
    write_dicom: bool = True
    max_cases: int | None = None  # forecast at most this many not-yet-done cases (then stop)

    def validate(self) -> None:
        _require(self.num_samples >= 1, "num_samples", "must be >= 1")
        _require(self.inference_steps >= 1, "inference_steps", "must be >= 1")
        _require(self.actors >= 1 and self.cases_per_batch >= 1, "actors", "actors and cases_per_batch must be >= 1")
        _require(self.split in ("train", "val", "test"), "split", "must be train, val or test")
        _require(self.sampler in (None, *SAMPLERS), "sampler", f"must be null or one of {', '.join(SAMPLERS)}")
