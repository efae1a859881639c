"""The platform's config tree. One small dataclass per component; later stages
(VAE, LDM, tuning, serving) add their own sections here.

Paths are plain strings, resolved against the working directory at run time, so the
same YAML works on a laptop and under `ray job submit --working-dir .`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cohortcast.config.cldm import CLDMConfig
from cohortcast.config.evaluation import EvaluationConfig
from cohortcast.config.loader import require as _require
from cohortcast.config.models import ForecasterConfig
from cohortcast.config.serving import ServeConfig
from cohortcast.config.training import ForecastJobConfig, MLflowConfig, TrainingConfig
from cohortcast.config.tuning import TuneConfig


@dataclass
class PrivacyConfig:
    """Keyed-hash pseudonyms. The secret comes from the environment variable named
    here (preferred: it never lands in a config file or MLflow params) or, failing
    that, from `secret`. Without either, a fixed development secret is used and a
    warning is logged: fine for synthetic data, wrong for real patients."""

    secret_env: str = "COHORTCAST_PSEUDONYM_SECRET"
    secret: str | None = None
    pseudonym_length: int = 16
    require_secret: bool = False

    def validate(self) -> None:
        _require(8 <= self.pseudonym_length <= 64, "pseudonym_length", "must be in 8..64 hex characters")


@dataclass
class SynthConfig:
    """Synthetic longitudinal chest-CT cohort (see cohortcast.data.synth)."""

    patients: int = 8
    seed: int = 0
    min_exams: int = 2
    max_exams: int = 4
    max_nodules: int = 2
    malignant_fraction: float = 0.3
    image_size: int = 96
    num_slices: int = 40
    pixel_spacing_mm: float = 3.5
    slice_thickness_mm: float = 5.0
    noise_hu: float = 25.0
    nifti_fraction: float = 0.25
    fibrosis_fraction: float = 0.4
    # CLDM cohort options (issue 15). Every default reproduces the NAMD cohort bit for bit:
    # the new randomness comes from new seed streams, drawn only when an option is on.
    # "linear": fibrosis grows without noise from 12% of the lung (the NAMD cohort);
    # "trend": a per-patient trend plus per-exam noise: a stable group (rate 0) and
    # progressors, baseline ~ U(fibrosis_baseline_range), rate ~ U(fibrosis_rate_range)
    # in fraction of lung per year, N(0, fibrosis_noise_sd) per exam.
    fibrosis_model: Literal["linear", "trend"] = "linear"
    fibrosis_stable_fraction: float = 0.4
    fibrosis_baseline_range: tuple[float, float] = (0.05, 0.25)
    fibrosis_rate_range: tuple[float, float] = (0.01, 0.06)
    fibrosis_noise_sd: float = 0.006
    # A lung mask (NIfTI uint8 on the CT grid, the aerated lung) for every CT.
    lung_masks: bool = False
    # One chest radiograph (DX DICOM, a projection of the same phantom) + report per exam;
    # the phantom then also has a heart (cardiomegaly) and pleural effusions.
    radiographs: bool = False
    radiograph_pixel_mm: float = 2.5
    cardiomegaly_fraction: float = 0.3
    effusion_onset: float = 0.2  # P(an effusion at an exam that follows one without)
    effusion_resolve: float = 0.5  # P(an effusion is gone at the next exam)

    def validate(self) -> None:
        _require(self.patients >= 1, "patients", "must be >= 1")
        _require(2 <= self.min_exams <= self.max_exams, "min_exams", "need 2 <= min_exams <= max_exams")
        _require(self.max_nodules >= 1, "max_nodules", "must be >= 1")
        _require(0.0 <= self.malignant_fraction <= 1.0, "malignant_fraction", "must be in [0, 1]")
        _require(self.image_size >= 32, "image_size", "must be >= 32 pixels")
        _require(self.num_slices >= 8, "num_slices", "must be >= 8")
        _require(self.pixel_spacing_mm > 0 and self.slice_thickness_mm > 0, "pixel_spacing_mm", "spacings must be > 0")
        _require(0.0 <= self.nifti_fraction <= 1.0, "nifti_fraction", "must be in [0, 1]")
        _require(0.0 <= self.fibrosis_fraction <= 1.0, "fibrosis_fraction", "must be in [0, 1]")
        _require(0.0 <= self.fibrosis_stable_fraction <= 1.0, "fibrosis_stable_fraction", "must be in [0, 1]")
        lo, hi = self.fibrosis_baseline_range
        _require(
            0.0 < lo <= hi <= 0.5,
            "fibrosis_baseline_range",
            f"need 0 < low <= high <= 0.5 (fraction of lung), got {list(self.fibrosis_baseline_range)}",
        )
        lo, hi = self.fibrosis_rate_range
        _require(
            0.0 < lo <= hi <= 0.2,
            "fibrosis_rate_range",
            f"need 0 < low <= high <= 0.2 (fraction of lung per year), got {list(self.fibrosis_rate_range)}",
        )
        _require(0.0 <= self.fibrosis_noise_sd <= 0.05, "fibrosis_noise_sd", "must be in [0, 0.05] (fraction of lung)")
        _require(
            0.25 <= self.radiograph_pixel_mm <= 10.0, "radiograph_pixel_mm", "must be in [0.25, 10] mm (detector pitch)"
        )
        _require(0.0 <= self.cardiomegaly_fraction <= 1.0, "cardiomegaly_fraction", "must be in [0, 1]")
        _require(0.0 <= self.effusion_onset <= 1.0, "effusion_onset", "must be in [0, 1]")
        _require(0.0 <= self.effusion_resolve <= 1.0, "effusion_resolve", "must be in [0, 1]")


@dataclass
class SplitConfig:
    """Patient-level split by keyed hash: stable when the cohort grows."""

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0

    def validate(self) -> None:
        parts = (self.train, self.val, self.test)
        _require(all(p >= 0 for p in parts), "train", "fractions must be >= 0")
        _require(abs(sum(parts) - 1.0) < 1e-6, "train", f"train + val + test must be 1, got {sum(parts):.3f}")


@dataclass
class IngestConfig:
    """Manifest -> nodule crops, 3D patches, study volumes (sharded Parquet)."""

    manifest: str = "runs/demo/cohort"
    output: str = "runs/demo/ingested"
    # NAMD inputs: nodule-centred axial crops.
    crop_size: int = 64
    crop_spacing_mm: float = 0.75
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    normalise: Literal["minus_one_one", "zero_one"] = "minus_one_one"
    # CLDM inputs: isotropic nodule patches and whole volumes (+ lesion masks).
    patch_size: int = 32
    patch_spacing_mm: float = 1.0
    volume_shape: tuple[int, int, int] = (32, 64, 64)
    include_volumes: bool = True
    # Whole-study resampling: a Gaussian prefilter (sigma (factor - 1) / 2 per axis,
    # skimage's rule) before shrinking volumes and radiographs; masks stay nearest-neighbour.
    antialias: bool = True
    # Single-plane studies (DX/CR radiographs): a (R, R) image covering the longer side.
    radiograph_size: int = 64
    split: SplitConfig = field(default_factory=SplitConfig)
    rows_per_file: int = 512
    # Read limits, checked from headers before anything is allocated or decompressed
    # (huge headers, decompression bombs): a study over either is quarantined as
    # `too_large`. The defaults fit a 2048-slice 512 x 512 CT with room to spare.
    max_voxels: int = 512 * 512 * 2048
    max_uncompressed_mb: int = 4096
    # Parallelism: one Ray task per study read; CPUs each task reserves.
    num_cpus_per_task: float = 1.0
    overwrite: bool = False

    def validate(self) -> None:
        _require(8 <= self.crop_size <= 1024, "crop_size", "must be in 8..1024 pixels")
        _require(self.crop_spacing_mm > 0, "crop_spacing_mm", "must be > 0")
        lo, hi = self.hu_window
        _require(lo < hi, "hu_window", f"low must be below high, got {list(self.hu_window)}")
        _require(4 <= self.patch_size <= 256, "patch_size", "must be in 4..256 voxels")
        _require(self.patch_spacing_mm > 0, "patch_spacing_mm", "must be > 0")
        _require(all(4 <= s <= 512 for s in self.volume_shape), "volume_shape", "each size must be in 4..512")
        _require(isinstance(self.antialias, bool), "antialias", f"must be true or false, got {self.antialias!r}")
        _require(8 <= self.radiograph_size <= 2048, "radiograph_size", "must be in 8..2048 pixels")
        _require(self.rows_per_file >= 1, "rows_per_file", "must be >= 1")
        _require(self.max_voxels >= 1, "max_voxels", "must be >= 1")
        _require(self.max_uncompressed_mb >= 1, "max_uncompressed_mb", "must be >= 1 (MB)")
        _require(self.num_cpus_per_task > 0, "num_cpus_per_task", "must be > 0")


@dataclass
class RayConfig:
    """How to reach Ray: `address` None starts (or joins) a local instance; "auto"
    joins the cluster this process runs in (what `ray job submit` gives)."""

    address: str | None = None
    num_cpus: int | None = None

    def validate(self) -> None:
        _require(self.num_cpus is None or self.num_cpus >= 1, "num_cpus", "must be >= 1")


@dataclass
class CohortcastConfig:
    """Root config. A synthetic cohort, when generated, is written to `ingest.manifest`.

    Relative paths anywhere in the tree resolve against `workdir` (default: the current
    directory). `ray job submit --working-dir .` runs the job in a copy of the project,
    so local runs set `workdir` to the project folder to keep outputs there."""

    run_name: str = "demo"
    workdir: str = "."
    synthesize_if_missing: bool = True
    synth: SynthConfig = field(default_factory=SynthConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ForecasterConfig = field(default_factory=ForecasterConfig)
    cldm: CLDMConfig = field(default_factory=CLDMConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    forecast: ForecastJobConfig = field(default_factory=ForecastJobConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
