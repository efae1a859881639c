"""The CLDM forecast request and answer (POST /v1/cldm/forecast), and what a valid one is.

A request is one patient's prior studies of one kind (CT volumes (D, H, W) or
radiographs (H, W), each base64 of a `.npy` in the ingestion intensity scale, [-1, 1],
on the grid the bundle's encoder reads) with how many days before the forecast date
each was taken. Priors may come in any order: they are put oldest first, as training
saw them, and the most recent one is the one `last_prior_mask_npy_b64` (its known ILD
mask, optional) belongs to. The same limits as the NAMD route apply: samples and steps
within the service's, days within `max_horizon_days`, the seed within 0..2**63-1, and
at most the bundle's `temporal.max_exams` priors."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from cohortcast.serving.requests import (
    SEED_MAX,
    RequestError,
    check_horizon,
    choose_sampler,
    decode_npy,
    encode_npy,
    read_npy,
    sampling_limits,
    shown,
)

MAX_PRIORS_FIELD = 64  # a schema bound; the bundle's own limit (GET /v1/cldm/model) is checked too


class CLDMPrior(BaseModel):
    image_npy_b64: str = Field(
        description="a prior study: base64 of a .npy, CT (D, H, W) or radiograph (H, W) as GET /v1/cldm/model "
        "gives, real float, finite values in [-1, 1]"
    )
    days_before_target: float = Field(
        description="days from this study to the forecast date (finite, > 0, at most the service's max_horizon_days)",
        gt=0,
        allow_inf_nan=False,
    )


class CLDMForecastRequest(BaseModel):
    kind: Literal["ct", "radiograph"] = Field(default="ct", description="which study kind the priors and forecast are")
    priors: list[CLDMPrior] = Field(
        min_length=1, max_length=MAX_PRIORS_FIELD, description="1..max_priors prior studies, in any order"
    )
    last_prior_mask_npy_b64: str | None = Field(
        default=None,
        description="the most recent prior's known ILD mask (.npy, the prior's shape, values 0/1): the answer "
        "then also carries the forecast anchored to it (CT with a segmentation decoder only)",
    )
    voxel_ml: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="one voxel's volume on the study grid, for mL figures"
    )
    method: Literal["diffusion", "regressor"] = Field(
        default="diffusion", description="diffusion (CLDM) or regressor (the no-diffusion baseline, if served)"
    )
    num_samples: int | None = Field(
        default=None, description="seeded samples (default: the service's; 1..max_samples, see GET /v1/cldm/model)"
    )
    steps: int | None = Field(default=None, description="sampler steps (default: the service's; 1..max_steps)")
    sampler: Literal["ddim", "dpmsolver++"] | None = Field(
        default=None, description="ddim or dpmsolver++ (default: the service's serve.cldm_default_sampler)"
    )
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="same request + seed = bit-identical answer")


class CLDMForecastAnswer(BaseModel):
    case_id: str = Field(description="content hash of the request (never an identifier)")
    kind: str
    method: str
    seed: int
    num_samples: int
    steps: int
    sampler: str
    priors_used: int
    token_variance_mean: float = Field(description="mean over tokens and channels of the per-sample token variance")
    probability_npy_b64: str | None = Field(description="mean over samples of the ILD probability, study grid")
    probability_variance_npy_b64: str | None = Field(description="per-voxel variance of that probability over samples")
    mask_npy_b64: str | None = Field(description="uint8 .npy: mean probability >= 0.5")
    fibrotic_voxels: int | None
    fibrotic_fraction: float | None
    fibrotic_volume_ml: float | None
    sample_voxels: list[int] | None = Field(description="each sample's own mask volume (voxels): the spread")
    sample_volume_ml: list[float] | None
    anchored_mask_npy_b64: str | None = Field(description="uint8 .npy: the last prior's mask edited by the forecast")
    anchored_voxels: int | None
    anchored_volume_ml: float | None
    report: str | None = Field(description="the generated report of the forecast radiograph")


@dataclass
class PreparedCLDMRequest:
    case_id: str  # content hash: seeds the samples, so equal requests give equal answers
    kind: str
    priors: list[tuple[np.ndarray, float]]  # oldest first
    last_prior_mask: np.ndarray | None
    voxel_ml: float | None
    method: str
    num_samples: int
    steps: int
    seed: int
    sampler: str

    @property
    def group(self) -> tuple:
        """Requests one bundle call can forecast together."""
        return (self.kind, self.method, self.num_samples, self.steps, self.sampler)


def decode_mask(text: str, field: str, shape: tuple[int, ...]) -> np.ndarray:
    """base64 of a .npy mask (bool, integer or float) of `shape` holding only 0 and 1 -> uint8."""
    raw, header_shape, dtype = read_npy(text, field)
    if dtype.kind not in "biuf":
        raise RequestError(field, f"dtype {dtype.str!r}; expected a bool, integer or float mask")
    if header_shape != tuple(shape):
        raise RequestError(field, f"shape {header_shape}; the priors are {tuple(shape)}")
    try:
        mask = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:
        raise RequestError(field, f"not base64 of a .npy file ({type(exc).__name__})") from None
    if not np.isin(mask, (0, 1)).all():
        raise RequestError(field, "a mask holds only 0 and 1")
    return mask.astype(np.uint8)


def _in_scale(image: np.ndarray, field: str) -> np.ndarray:
    if image.min() < -1.0001 or image.max() > 1.0001:
        raise RequestError(
            field, f"values in [{image.min():.3g}, {image.max():.3g}]; expected the ingestion scale [-1, 1]"
        )
    return image.astype(np.float32)


def prepare_cldm(request: CLDMForecastRequest, info: dict[str, Any], cfg) -> PreparedCLDMRequest:
    """Validate against the bundle (`info`: CLDMBundle.info()) and the service limits;
    raises RequestError naming the field."""
    if request.kind not in info["kinds"]:
        raise RequestError("kind", f"{shown(request.kind)}: this model forecasts {info['kinds']}")
    if not 1 <= len(request.priors) <= info["max_priors"]:
        raise RequestError("priors", f"{len(request.priors)} priors; this model takes 1..{info['max_priors']}")
    if request.method == "regressor" and not info["regressor"]:
        raise RequestError("method", "this model has no no-diffusion regressor; use method=diffusion")
    shape = tuple(info["image_shapes"][request.kind])
    priors = []
    for i, prior in enumerate(request.priors):
        field = f"priors.{i}.image_npy_b64"
        image = _in_scale(decode_npy(prior.image_npy_b64, field, shape), field)
        days = check_horizon(prior.days_before_target, cfg, field=f"priors.{i}.days_before_target")
        priors.append((image, days))
    priors.sort(key=lambda p: -p[1])  # oldest first (stable: equal days keep the request's order)
    mask = None
    if request.last_prior_mask_npy_b64 is not None:
        if request.kind not in info["anchoring_kinds"]:
            raise RequestError("last_prior_mask_npy_b64", f"this model cannot anchor {request.kind} forecasts")
        mask = decode_mask(request.last_prior_mask_npy_b64, "last_prior_mask_npy_b64", shape)
    samples, steps = sampling_limits(
        request.num_samples, request.steps, cfg, min(cfg.cldm_default_steps, cfg.max_steps)
    )
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= SEED_MAX:
        raise RequestError("seed", f"{shown(request.seed)} is outside 0..{SEED_MAX}")
    digest = hashlib.sha256(json.dumps([request.kind, request.method, request.voxel_ml]).encode())
    for image, days in priors:
        digest.update(image.tobytes() + json.dumps(days).encode())
    digest.update(b"mask" + (mask.tobytes() if mask is not None else b"none"))
    return PreparedCLDMRequest(
        f"req-{digest.hexdigest()[:24]}",
        request.kind,
        priors,
        mask,
        request.voxel_ml,
        request.method,
        samples,
        steps,
        request.seed,
        choose_sampler(request.sampler, cfg, cfg.cldm_default_sampler),
    )


def _npy(array: np.ndarray | None, dtype=np.float32) -> str | None:
    if array is None:
        return None
    if dtype == np.float32:
        return encode_npy(array)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def _floats(values) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def cldm_answer(item: PreparedCLDMRequest, forecast) -> dict[str, Any]:
    """A CaseForecast (models.cldm_bundle) -> the JSON answer."""
    return {
        "case_id": item.case_id,
        "kind": item.kind,
        "method": item.method,
        "seed": item.seed,
        "num_samples": item.num_samples,
        "steps": item.steps,
        "sampler": item.sampler,
        "priors_used": len(item.priors),
        "token_variance_mean": float(np.mean(forecast.token_variance)),
        "probability_npy_b64": _npy(forecast.probability),
        "probability_variance_npy_b64": _npy(forecast.probability_variance),
        "mask_npy_b64": _npy(forecast.mask, np.uint8),
        "fibrotic_voxels": forecast.fibrotic_voxels,
        "fibrotic_fraction": forecast.fibrotic_fraction,
        "fibrotic_volume_ml": forecast.fibrotic_volume_ml,
        "sample_voxels": None if forecast.sample_voxels is None else [int(v) for v in forecast.sample_voxels],
        "sample_volume_ml": _floats(forecast.sample_volume_ml),
        "anchored_mask_npy_b64": _npy(forecast.anchored_mask, np.uint8),
        "anchored_voxels": forecast.anchored_voxels,
        "anchored_volume_ml": forecast.anchored_volume_ml,
        "report": forecast.report,
    }
