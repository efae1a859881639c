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
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from cohortcast.config.models import SAMPLERS
from cohortcast.errors import CohortcastError

SEED_MAX = 2**63 - 1
MAX_NPY_ELEMENTS = 2**26  # any array a request may carry (a 512 x 512 crop is 2**18)


class ForecastSettings(BaseModel):
    """What every forecast request carries besides its image."""

    horizon_days: float = Field(
        description="days from the baseline to the forecast date (finite, > 0, at most the service's max_horizon_days)",
        gt=0,
        allow_inf_nan=False,
    )
    ehr: dict[str, Any] = Field(
        default_factory=dict, description="NAMD EHR features by manifest name, e.g. {'age': 63, 'SCT_LONG_DIA': 9.5}"
    )
    num_samples: int | None = Field(
        default=None, description="seeded DDIM samples (default: the service's; 1..max_samples, see GET /v1/model)"
    )
    steps: int | None = Field(default=None, description="sampler steps (default: the service's; 1..max_steps)")
    sampler: Literal["ddim", "dpmsolver++"] | None = Field(
        default=None, description="ddim or dpmsolver++ (default: the service's serve.default_sampler)"
    )
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="same request + seed = bit-identical answer")


class ForecastRequest(ForecastSettings):
    crop_npy_b64: str = Field(
        description="baseline crop: base64 of a .npy file, (H, W) real float, finite values in [-1, 1]"
    )


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the service's own routes."""

    error: str = Field(description="what is wrong")
    field: str | None = Field(
        description="the request field at fault (e.g. horizon_days, ehr.age, study, Authorization), or null"
    )


class RequestError(CohortcastError, ValueError):
    """A request field is invalid: answered with `status` (400 unless said otherwise)
    and {"field", "error"} (the service's CohortcastError handler)."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.http_status = field, message, status

    @property
    def status(self) -> int:
        return self.http_status

    @property
    def user_message(self) -> str:
        return self.message  # the field travels beside it in the answer


@dataclass
class PreparedRequest:
    case_id: str  # content hash: seeds the samples, so equal requests give equal answers
    crop: np.ndarray  # (H, W) float32
    horizon_days: float
    ehr: dict[str, Any] | None  # validated EHR record, for a model with an EHR encoder
    num_samples: int
    steps: int
    seed: int
    sampler: str


def shown(value: Any, limit: int = 60) -> str:
    """A client value for an error message, cut short (a huge value must not come back whole)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _npy_header(buffer: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header, read before numpy allocates the array (a header
    can claim any shape: a few bytes of request must not reserve gigabytes)."""
    from numpy.lib import format as npy

    version = npy.read_magic(buffer)
    if version == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(buffer)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = npy.read_array_header_2_0(buffer)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), np.dtype(dtype)


def read_npy(text: str, field: str) -> tuple[bytes, tuple[int, ...], np.dtype]:
    """base64 of a .npy file -> (its bytes, shape, dtype), the header read before any
    array is allocated; RequestError naming `field` when it is not one."""
    try:
        raw = base64.b64decode(text, validate=True)
        header_shape, dtype = _npy_header(io.BytesIO(raw))
    except Exception as exc:  # binascii.Error, ValueError, EOFError...: all "not a .npy"
        raise RequestError(field, f"not base64 of a .npy file ({type(exc).__name__})") from None
    return raw, header_shape, dtype


def decode_npy(text: str, field: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """base64 of a .npy file -> a finite real float array (of `shape` when given);
    anything else raises RequestError naming `field`."""
    raw, header_shape, dtype = read_npy(text, field)
    if dtype.kind != "f":  # complex, integer, bool, structured, object: not an image in the ingestion scale
        raise RequestError(field, f"dtype {dtype.str!r}; expected a real float array (float16/32/64)")
    if shape is not None and header_shape != tuple(shape):
        raise RequestError(field, f"shape {header_shape}; this model takes {tuple(shape)} arrays")
    if int(np.prod(header_shape, dtype=np.float64)) > MAX_NPY_ELEMENTS:
        raise RequestError(field, f"shape {header_shape} holds more than {MAX_NPY_ELEMENTS} values", status=413)
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # truncated data after a valid header
        raise RequestError(field, f"not base64 of a .npy file ({type(exc).__name__})") from None
    return check_array(array, field, shape)


def check_array(array: np.ndarray, field: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A real float array of `shape` (when given) holding only finite values, else RequestError."""
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise RequestError(field, "expected a real float array")
    if shape is not None and array.shape != tuple(shape):
        raise RequestError(field, f"shape {array.shape}; this model takes {tuple(shape)} arrays")
    if not np.isfinite(array).all():
        raise RequestError(field, "must hold finite numbers (no NaN or infinity)")
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
    return {
        "case_id": item.case_id,
        "seed": item.seed,
        "num_samples": item.num_samples,
        "steps": item.steps,
        "sampler": item.sampler,
        "mean_npy_b64": encode_npy(result["mean"]),
        "variance_npy_b64": encode_npy(variance),
        "samples_npy_b64": encode_npy(result["samples"]),
        "mean_png_b64": encode_png(result["mean"], -1.0, 1.0),
        "variance_png_b64": encode_png(variance, 0.0, float(variance.max())),
        "malignancy_probability": probabilities,
        "malignancy_probability_mean": float(np.mean(probabilities)) if probabilities else None,
    }


def _finite_number(value: Any) -> float | None:
    """`value` as a finite float, or None (bools, strings, NaN, infinities and integers
    too large for a float are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if np.isfinite(number) else None


def check_ehr(ehr: dict[str, Any]) -> dict[str, Any]:
    """The EHR record checked against the manifest schema; RequestError names the feature."""
    from cohortcast.data.manifest import EHR_FEATURES, SCHEMA

    if not isinstance(ehr, dict):
        raise RequestError("ehr", "expected an object of EHR features")
    columns = {**SCHEMA["patients"], **SCHEMA["findings"]}
    for name, value in ehr.items():
        where = f"ehr.{name}" if isinstance(name, str) and len(name) <= 60 else "ehr"
        if name not in EHR_FEATURES:
            raise RequestError(where, f"unknown EHR feature {shown(name)}; known: {list(EHR_FEATURES)}")
        column = columns[name]
        if value is None:
            if column.required:
                raise RequestError(where, "is required")
            continue
        if column.kind == "float":
            number = _finite_number(value)
            if number is None:
                raise RequestError(where, f"expected a finite number, got {shown(value)}")
            if column.check and not column.check(number):
                raise RequestError(where, f"{shown(value)} is not {column.check_text}")
        elif not isinstance(value, str) or (column.choices and value not in column.choices):
            raise RequestError(where, f"{shown(value)} is not one of {list(column.choices or ())}")
    return ehr


def _count(value: Any, default: int, limit: int, field: str) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise RequestError(field, f"{shown(value)} is outside 1..{limit}")
    return value


def sampling_limits(
    num_samples: int | None, steps: int | None, cfg, default_steps: int | None = None
) -> tuple[int, int]:
    """(samples, steps) with the service's defaults filled in (`default_steps`: another
    default than serve.default_steps), within its limits."""
    return (
        _count(num_samples, cfg.default_samples, cfg.max_samples, "num_samples"),
        _count(steps, default_steps or cfg.default_steps, cfg.max_steps, "steps"),
    )


def choose_sampler(sampler: Any, cfg, default: str | None = None) -> str:
    """The request's sampler, or the service's default (`default`: another than
    serve.default_sampler); pydantic checks JSON requests, a request built in code gets
    the same answer."""
    if sampler is None:
        return default or cfg.default_sampler
    if sampler not in SAMPLERS:
        raise RequestError("sampler", f"{shown(sampler)} is not one of {', '.join(SAMPLERS)}")
    return sampler


def prepare(request: ForecastRequest, crop_shape: tuple[int, int], cfg, uses_ehr: bool) -> PreparedRequest:
    """Validate against the model and the service limits; raises RequestError."""
    return prepare_crop(
        decode_npy(request.crop_npy_b64, "crop_npy_b64", tuple(crop_shape)),
        request,
        crop_shape,
        cfg,
        uses_ehr,
        field="crop_npy_b64",
    )


def check_horizon(horizon_days: Any, cfg, field: str = "horizon_days") -> float:
    """Finite, > 0 and within the service's limit (pydantic checks the first two for
    JSON; a request built in code gets the same answer)."""
    number = _finite_number(horizon_days)
    if number is None or number <= 0:
        raise RequestError(field, f"{shown(horizon_days)} is not a finite number of days > 0")
    if number > cfg.max_horizon_days:
        raise RequestError(field, f"{shown(horizon_days)} exceeds the limit {cfg.max_horizon_days}")
    return number


def prepare_crop(
    crop: np.ndarray, request, crop_shape: tuple[int, int], cfg, uses_ehr: bool, field: str
) -> PreparedRequest:
    """A decoded crop + the request's horizon, EHR, samples, steps and seed (any object
    with those attributes) -> a PreparedRequest; `field` names the crop's source in errors."""
    check_array(crop, field, tuple(crop_shape))
    if crop.min() < -1.0001 or crop.max() > 1.0001:
        raise RequestError(
            field, f"values in [{crop.min():.3g}, {crop.max():.3g}]; expected the ingestion scale [-1, 1]"
        )
    horizon = check_horizon(request.horizon_days, cfg)
    samples, steps = sampling_limits(request.num_samples, request.steps, cfg)
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= SEED_MAX:
        raise RequestError("seed", f"{shown(request.seed)} is outside 0..{SEED_MAX}")
    ehr = check_ehr(dict(request.ehr))  # validated even when this model does not use it
    ehr = ehr if uses_ehr else None
    crop = crop.astype(np.float32)
    # The case id (it seeds the samples, and equal ids share one answer) hashes what the
    # model sees: the crop, the horizon and the validated EHR record itself (the rendered
    # prompt rounds values that the structured encoder reads exactly).
    digest = hashlib.sha256(crop.tobytes() + json.dumps([horizon, ehr], sort_keys=True, default=str).encode())
    sampler = choose_sampler(getattr(request, "sampler", None), cfg)
    return PreparedRequest(f"req-{digest.hexdigest()[:24]}", crop, horizon, ehr, samples, steps, request.seed, sampler)
