"""Request and response bodies of the forecasting API, and what a valid request is.

A crop travels as base64 of a NumPy `.npy` file (H, W) in the ingestion intensity scale
([-1, 1]), the shape the Forecaster was trained on. EHR values are checked against the
cohort manifest's own schema, so the API accepts exactly what training saw."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field


class ForecastSettings(BaseModel):
    """What every forecast request carries besides its image."""

    horizon_days: float = Field(description="days from the baseline to the forecast date", gt=0)
    ehr: dict[str, Any] = Field(default_factory=dict, description="NAMD EHR features by manifest name, e.g. "
                                "{'age': 63, 'SCT_LONG_DIA': 9.5}")
    num_samples: int | None = Field(default=None, description="seeded DDIM samples (default: the service's)")
    steps: int | None = Field(default=None, description="DDIM steps (default: the service's)")
    seed: int = Field(default=0, ge=0, description="same request + seed = bit-identical answer")


class ForecastRequest(ForecastSettings):
    crop_npy_b64: str = Field(description="baseline crop: base64 of a .npy file, (H, W) float, values in [-1, 1]")


class RequestError(ValueError):
    """A request field is invalid: answered with `status` (400 unless said otherwise)
    and {"field", "error"}."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class PreparedRequest:
    case_id: str  # content hash: seeds the samples, so equal requests give equal answers
    crop: np.ndarray  # (H, W) float32
    horizon_days: float
    ehr: dict[str, Any] | None  # validated EHR record, for a model with an EHR encoder
    num_samples: int
    steps: int
    seed: int


def decode_npy(text: str, field: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except Exception as exc:  # binascii.Error, ValueError, EOFError...: all "not a .npy"
        raise RequestError(field, f"not base64 of a .npy file ({type(exc).__name__})") from None
    return array


def encode_npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float32), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def encode_png(image: np.ndarray, low: float, high: float) -> str:
    """(H, W) -> base64 of an 8-bit greyscale PNG, `low`..`high` mapped to 0..255 (a
    preview for browsers; the .npy carries the values)."""
    from PIL import Image

    unit = np.clip((np.asarray(image, np.float64) - low) / max(high - low, 1e-12), 0.0, 1.0)
    buffer = io.BytesIO()
    Image.fromarray(np.round(unit * 255).astype(np.uint8)).save(buffer, format="PNG")  # uint8 (H, W): greyscale
    return base64.b64encode(buffer.getvalue()).decode()


def forecast_answer(item: PreparedRequest, result: dict[str, Any]) -> dict[str, Any]:
    """The JSON answer: mean, variance and samples as .npy (exact), mean and variance as
    PNG previews, per-sample malignancy probabilities when an evaluator is served."""
    variance = result["variance"]
    probabilities = result.get("malignancy_probability")
    return {"case_id": item.case_id, "seed": item.seed, "num_samples": item.num_samples, "steps": item.steps,
            "mean_npy_b64": encode_npy(result["mean"]), "variance_npy_b64": encode_npy(variance),
            "samples_npy_b64": encode_npy(result["samples"]),
            "mean_png_b64": encode_png(result["mean"], -1.0, 1.0),
            "variance_png_b64": encode_png(variance, 0.0, float(variance.max())),
            "malignancy_probability": probabilities,
            "malignancy_probability_mean": float(np.mean(probabilities)) if probabilities else None}


def check_ehr(ehr: dict[str, Any]) -> dict[str, Any]:
    from cohortcast.data.manifest import EHR_FEATURES, SCHEMA

    columns = {**SCHEMA["patients"], **SCHEMA["findings"]}
    for name, value in ehr.items():
        if name not in EHR_FEATURES:
            raise RequestError(f"ehr.{name}", f"unknown EHR feature; known: {list(EHR_FEATURES)}")
        column = columns[name]
        if value is None:
            if column.required:
                raise RequestError(f"ehr.{name}", "is required")
            continue
        if column.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise RequestError(f"ehr.{name}", f"expected a number, got {value!r}")
            if column.check and not column.check(float(value)):
                raise RequestError(f"ehr.{name}", f"{value!r} is not {column.check_text}")
        elif column.choices and value not in column.choices:
            raise RequestError(f"ehr.{name}", f"{value!r} is not one of {list(column.choices)}")
    return ehr


def sampling_limits(num_samples: int | None, steps: int | None, cfg) -> tuple[int, int]:
    """(samples, steps) with the service's defaults filled in, within its limits."""
    samples = cfg.default_samples if num_samples is None else num_samples
    steps = cfg.default_steps if steps is None else steps
    if not 1 <= samples <= cfg.max_samples:
        raise RequestError("num_samples", f"{samples} is outside 1..{cfg.max_samples}")
    if not 1 <= steps <= cfg.max_steps:
        raise RequestError("steps", f"{steps} is outside 1..{cfg.max_steps}")
    return samples, steps


def prepare(request: ForecastRequest, crop_shape: tuple[int, int], cfg, uses_ehr: bool) -> PreparedRequest:
    """Validate against the model and the service limits; raises RequestError."""
    return prepare_crop(decode_npy(request.crop_npy_b64, "crop_npy_b64"), request, crop_shape, cfg, uses_ehr,
                        field="crop_npy_b64")


def prepare_crop(crop: np.ndarray, request, crop_shape: tuple[int, int], cfg, uses_ehr: bool,
                 field: str) -> PreparedRequest:
    """A decoded crop + the request's horizon, EHR, samples, steps and seed (any object
    with those attributes) -> a PreparedRequest; `field` names the crop's source in errors."""
    if crop.shape != tuple(crop_shape):
        raise RequestError(field, f"shape {crop.shape}; this model takes {tuple(crop_shape)} crops")
    if not np.issubdtype(crop.dtype, np.number) or not np.isfinite(crop).all():
        raise RequestError(field, "must hold finite numbers")
    if crop.min() < -1.0001 or crop.max() > 1.0001:
        raise RequestError(field, f"values in [{crop.min():.3g}, {crop.max():.3g}]; expected the ingestion "
                                  "scale [-1, 1]")
    if request.horizon_days > cfg.max_horizon_days:
        raise RequestError("horizon_days", f"{request.horizon_days} exceeds the limit {cfg.max_horizon_days}")
    samples, steps = sampling_limits(request.num_samples, request.steps, cfg)
    ehr = check_ehr(dict(request.ehr))  # validated even when this model does not use it
    ehr = ehr if uses_ehr else None
    crop = crop.astype(np.float32)
    # The case id (it seeds the samples, and equal ids share one answer) hashes what the
    # model sees: the crop, the horizon and the validated EHR record itself (the rendered
    # prompt rounds values that the structured encoder reads exactly).
    digest = hashlib.sha256(crop.tobytes() + json.dumps([request.horizon_days, ehr], sort_keys=True,
                                                        default=str).encode())
    return PreparedRequest(f"req-{digest.hexdigest()[:24]}", crop, float(request.horizon_days), ehr, samples, steps,
                           request.seed)
