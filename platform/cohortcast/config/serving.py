"""The forecasting service (`cohortcast serve`): model, batching, limits, replicas."""

from __future__ import annotations

from dataclasses import dataclass, field

from cohortcast.config.loader import require as _require
from cohortcast.config.models import SAMPLERS


@dataclass
class AutoscalingConfig:
    """Ray Serve autoscaling of the model deployment (replaces `num_replicas` when
    enabled): replicas are added while each holds more than `target_ongoing_requests`."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0

    def serve_options(self) -> dict:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


@dataclass
class ServeConfig:
    """`forecaster`: a local Forecaster folder or an MLflow model URI (models:/name/3,
    models:/name@alias, runs:/<id>/forecaster). `evaluator`: an evaluator folder (the
    evaluation job's ViT): answers then carry per-sample malignancy probabilities.
    `auth_token_env`: the name of an
    environment variable holding a bearer token; unset = no authentication.
    Dynamic batching gathers up to `max_batch_size` requests for `batch_wait_timeout_s`;
    every request's N samples are folded into the same network calls, run in micro-batches
    of `micro_batch` rows."""

    forecaster: str = "runs/demo/train/ldm_cond"
    # A CLDM training output (cldm.training.output: encoder/, diffusion/, decoders):
    # served at /v1/cldm/* next to the NAMD routes; None = no CLDM routes (404).
    cldm_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 8
    # Rows (samples) per network call; fixed, so answers do not depend on the batch.
    # None: the Forecaster's own scheduler.micro_batch.
    micro_batch: int | None = None
    batch_wait_timeout_s: float = 0.05
    default_samples: int = 20
    max_samples: int = 32
    # A request that names no sampler or steps gets 5 DPM-Solver++ steps: on the trained
    # namd_cpu Forecaster within 0.01 AUROC of 50 DDIM steps and 5.3-6.6x the requests/s
    # of a warm replica (benchmarks/RESULTS.md, "Few-step sampling"); a request can still
    # ask for sampler "ddim" and up to max_steps.
    default_steps: int = 5
    max_steps: int = 100
    default_sampler: str = "dpmsolver++"  # "ddim" | "dpmsolver++"
    # CLDM requests (/v1/cldm/*) keep DDIM 50: the few-step comparison was made on NAMD's
    # evaluation cohort only, and nothing measured says 5 steps hold for CLDM's decoders.
    # Capped at max_steps, so a service that lowers max_steps need not restate it.
    cldm_default_steps: int = 50
    cldm_default_sampler: str = "ddim"
    max_horizon_days: float = 3650.0
    max_ongoing_requests: int = 16  # per replica; beyond it requests queue...
    max_queued_requests: int = 64  # ...and beyond this the service answers 503
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    auth_token_env: str | None = None
    evaluator: str | None = None
    max_upload_mb: float = 512.0  # whole-study uploads (NIfTI / DICOM series), as sent
    # What an upload may unpack to: zip members and .nii.gz streams are counted while
    # they are decompressed (headers can lie), and the image's voxels from its header
    # before any array is allocated. Defaults fit one large chest CT (512 x 512 x 1024).
    max_uncompressed_mb: float = 2048.0
    max_voxels: int = 512 * 512 * 1024
    max_study_files: int = 4096  # files in one upload (DICOM slices, zip members)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    # Cohort requests run as Ray jobs writing under cohort_output/<job id>; jobs_address:
    # the Ray dashboard (job API) address, None = the cluster the service runs on.
    cohort_output: str = "runs/serve/cohorts"
    jobs_address: str | None = None
    # Folders a cohort request may name (an ingested cohort at or under one of them).
    # Empty (the default): cohort submission is disabled (403), because a job reads
    # whatever the cluster can read and the service cannot guess which storage is meant
    # to be public to its clients.
    cohort_roots: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _require(1 <= self.default_samples <= self.max_samples, "default_samples", "must be in 1..max_samples")
        _require(1 <= self.default_steps <= self.max_steps, "default_steps", "must be in 1..max_steps")
        _require(self.default_sampler in SAMPLERS, "default_sampler", f"must be one of {', '.join(SAMPLERS)}")
        _require(self.cldm_default_steps >= 1, "cldm_default_steps", "must be >= 1 (above max_steps: capped there)")
        _require(self.cldm_default_sampler in SAMPLERS, "cldm_default_sampler", f"must be one of {', '.join(SAMPLERS)}")
        _require(
            self.max_batch_size >= 1 and self.batch_wait_timeout_s >= 0,
            "max_batch_size",
            "max_batch_size must be >= 1 and batch_wait_timeout_s >= 0",
        )
        _require(
            self.max_ongoing_requests >= 1 and self.max_queued_requests >= 0,
            "max_queued_requests",
            "max_ongoing_requests must be >= 1, max_queued_requests >= 0",
        )
        _require(
            self.max_upload_mb > 0 and self.max_uncompressed_mb > 0,
            "max_uncompressed_mb",
            "max_upload_mb and max_uncompressed_mb must be > 0",
        )
        _require(
            self.max_voxels >= 1 and self.max_study_files >= 1,
            "max_voxels",
            "max_voxels and max_study_files must be >= 1",
        )
        _require(self.max_horizon_days > 0, "max_horizon_days", "must be > 0")
        _require(self.micro_batch is None or self.micro_batch >= 1, "micro_batch", "must be >= 1 (or unset)")
        scale = self.autoscaling
        _require(
            0 <= scale.min_replicas <= scale.max_replicas
            and scale.max_replicas >= 1
            and scale.target_ongoing_requests > 0,
            "autoscaling",
            "needs 0 <= min_replicas <= max_replicas, max_replicas >= 1, target_ongoing_requests > 0",
        )
