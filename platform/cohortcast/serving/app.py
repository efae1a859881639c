"""The HTTP front door (FastAPI on Ray Serve): validation, authentication, JSON.

    GET  /healthz        liveness
    GET  /v1/model       which Forecaster, its version (training stage key), input shape
    POST /v1/forecast    a crop + EHR + horizon + samples + seed -> mean, variance, samples
    POST /v1/forecast/study  a NIfTI / DICOM upload + nodule centre + the same settings ->
                         the same JSON, or (?format=nifti) a .zip of NIfTI files on the
                         study's patient-space grid
    POST /v1/cohorts     an ingested cohort -> a job id (a Ray job runs the batch forecast)
    GET  /v1/cohorts/ID  the job's status and where its results are
    GET  /v1/cldm/model  the served CLDM bundle (when serve.cldm_model is set): study
                         kinds and shapes, max priors, which decoders, limits
    POST /v1/cldm/forecast  prior studies of one kind + days before the target + samples,
                         steps, seed (+ the last prior's mask) -> forecast ILD mask, its
                         volume, per-sample spread, a generated report (radiographs)
    GET  /docs           OpenAPI documentation

Errors: every refused request answers {"error", "field"} (ErrorBody) with a 4xx naming
the field at fault; a dependency that is not there (the model replica, Ray's job
server) is a 503 with a message. Code raises a CohortcastError (RequestError for a
field) and one handler turns it into its status and body; one route dependency
(`authorized`) checks the bearer token. Validation errors never echo the offending
input (it may be huge, non-finite or identifying), and no answer carries a server path.
Blocking work (decoding, study reading, PNG encoding, the job client) runs in worker
threads, so one request never stalls the others on a replica, health checks included.
"""

# No `from __future__ import annotations`: Serve rebuilds the routes inside the replica,
# where string annotations of the request models no longer resolve (OpenAPI then fails).

import dataclasses
import hmac
import logging
from typing import Any, Literal

from fastapi import Depends, FastAPI, File, Form, Header, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cohortcast import __version__
from cohortcast.config.serving import ServeConfig
from cohortcast.errors import CohortcastError
from cohortcast.serving.cldm_requests import CLDMForecastAnswer, CLDMForecastRequest, cldm_answer, prepare_cldm
from cohortcast.serving.cohort_jobs import (
    CohortJob,
    CohortRequest,
    CohortStatus,
    cohort_status,
    job_client,
    submit_cohort,
)
from cohortcast.serving.model_source import study_preprocessing
from cohortcast.serving.requests import ErrorBody, ForecastRequest, RequestError, forecast_answer, prepare, prepare_crop
from cohortcast.serving.studies import StudyForecastRequest, StudyLimits, Upload, nifti_zip, study_crop

log = logging.getLogger(__name__)

# redirect_slashes off: a wrong path is a 404 here, not a redirect to another route.
app = FastAPI(
    title="cohortcast forecasting",
    version=__version__,
    redirect_slashes=False,
    description="Seeded multi-sample DDIM forecasts of a nodule crop at a future date (NAMD).",
)


class ForecastAnswer(BaseModel):
    case_id: str = Field(description="content hash of the request (never an identifier)")
    seed: int
    num_samples: int
    steps: int
    sampler: str
    mean_npy_b64: str
    variance_npy_b64: str
    samples_npy_b64: str
    mean_png_b64: str
    variance_png_b64: str
    malignancy_probability: list[float] | None
    malignancy_probability_mean: float | None


class StudyForecastAnswer(ForecastAnswer):
    center_lps_mm: list[float]
    crop_spacing_mm: float


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route gives (all ErrorBody JSON)."""
    what = {
        400: "a field is invalid",
        401: "missing or wrong bearer token (when the service has one)",
        403: "not allowed on this service",
        404: "no such job, or no such model on this service",
        413: "the upload or what it unpacks to is over a limit",
        422: "the request does not match the schema",
        503: "a dependency (the model, Ray's job server) is unavailable, or the service is overloaded",
    }
    return {code: {"model": ErrorBody, "description": what[code]} for code in codes}


def _error(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field})


def _validation_field(error: dict) -> str:
    """FastAPI's error location -> the field's name as the client wrote it."""
    if error.get("type") == "json_invalid":  # located by character offset: the body as a whole
        return "body"
    parts = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "header", "path", "form")]
    return ".".join(parts) or "body"


async def _on_validation_error(request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default answer echoes the input, which fails to serialise when it is NaN
    # (a 500) and would send back whatever the client put there. Name the field only.
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request"}
    return _error(422, _validation_field(first), str(first.get("msg", "invalid request")))


async def _on_cohortcast_error(request, exc: CohortcastError) -> JSONResponse:
    # Every error of ours (RequestError and the rest) answers its own status and message,
    # worded without server paths. One raised in another process (the model replica)
    # arrives wrapped by Ray, its text holding the remote traceback: raised on, it is the
    # last-resort 500 below, like any other failure there.
    from ray.exceptions import RayError

    if isinstance(exc, RayError):
        raise exc
    return _error(exc.http_status, exc.field, exc.user_message)


async def _on_http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths (404), wrong methods (405), unparseable multipart bodies (400): the
    # same ErrorBody as every other refusal, so clients need one error shape.
    return JSONResponse(
        status_code=exc.status_code,
        content={"error": str(exc.detail), "field": None},
        headers=getattr(exc, "headers", None),
    )


async def _on_unexpected(request, exc: Exception) -> JSONResponse:
    # Last resort only (causes are fixed where they arise): a schema-conformant 500
    # without internals; the traceback goes to the replica's log.
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return _error(500, None, "internal error")


# Registered before @serve.ingress freezes a copy of `app` for the replicas.
app.add_exception_handler(RequestValidationError, _on_validation_error)
app.add_exception_handler(CohortcastError, _on_cohortcast_error)
app.add_exception_handler(StarletteHTTPException, _on_http_error)
app.add_exception_handler(Exception, _on_unexpected)


def _unavailable(exc: Exception) -> bool:
    """Errors that mean the model deployment is not there (or full), not a bug."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return isinstance(
        exc,
        (
            RayActorError,
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
            ConnectionError,
            TimeoutError,
        ),
    )


async def _read_bounded(files: list[UploadFile], limit: int) -> list[Upload]:
    """Read uploads in chunks, refusing (413) past `limit` bytes instead of holding an
    arbitrarily large body in memory first."""
    uploads, total = [], 0
    for upload in files:
        chunks = []
        while chunk := await upload.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise RequestError(
                    "study", f"uploads exceed the limit of serve.max_upload_mb ({limit / 2**20:.0f} MiB)", status=413
                )
            chunks.append(chunk)
        uploads.append(Upload(upload.filename or "", b"".join(chunks)))
    return uploads


async def current_api():
    """The ForecastAPI answering this request: the replica's object, as Serve injects
    it as `self` (serving/local.py overrides this dependency to run in one process)."""
    return serve.get_replica_context().servable_object


async def authorized(authorization: str | None = Header(default=None), api=Depends(current_api)) -> None:
    """Route dependency: 401 unless the request carries the service's bearer token
    (when it has one). Compared in constant time."""
    if api.token is None:
        return
    expected = f"Bearer {api.token}"
    if authorization is None or not hmac.compare_digest(authorization.encode(), expected.encode()):
        raise RequestError("Authorization", "missing or wrong bearer token", status=401)


# Every route but /healthz (and /docs).
AUTHORIZED = [Depends(authorized)]


def _study_settings(text: str) -> StudyForecastRequest:
    """The `request` form field (JSON) -> settings; 422 naming the first bad field.
    (Above ForecastAPI: @serve.ingress pickles the routes when the class is defined,
    and a module global defined later is then missing in the replica.)"""
    try:
        return StudyForecastRequest.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RequestError(f"request.{where}" if where else "request", first["msg"], status=422) from None


# Service limits a Serve `user_config` may change on live replicas (reconfigure).
LIVE_SETTINGS = (
    "default_samples",
    "max_samples",
    "default_steps",
    "max_steps",
    "default_sampler",
    "cldm_default_steps",
    "cldm_default_sampler",
    "max_horizon_days",
    "max_upload_mb",
    "max_uncompressed_mb",
    "max_voxels",
    "max_study_files",
    "cohort_roots",
)


@serve.ingress(app)
class ForecastAPI:
    def __init__(self, model, cfg: ServeConfig, token: str | None, llm_path: str | None, ingest, cldm=None):
        self.model, self.cfg, self.token, self.llm_path, self.ingest = model, cfg, token, llm_path, ingest
        self.cldm = cldm  # the CLDM deployment's handle, None when the service serves none
        self._info: dict[str, Any] | None = None
        self._cldm_info: dict[str, Any] | None = None
        self._jobs = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's `user_config` hook: the request limits (LIVE_SETTINGS) change without
        restarting replicas; a bad value is refused and the old limits stay."""
        unknown = set(config) - set(LIVE_SETTINGS)
        if unknown:
            raise ValueError(f"ForecastAPI user_config: unknown keys {sorted(unknown)}; known: {LIVE_SETTINGS}")
        updated = dataclasses.replace(self.cfg, **config)
        updated.validate()
        self.cfg = updated

    def check_health(self) -> None:
        """Serve's periodic health check; the ingress holds no state that can break, and
        answers promptly because nothing blocks its event loop."""

    def jobs(self):
        """Blocking (connects to the job server): call it from a worker thread."""
        if self._jobs is None:
            self._jobs = job_client(self.cfg.jobs_address)
        return self._jobs

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._model_call("info")
        return self._info

    async def cldm_info(self) -> dict[str, Any]:
        if self.cldm is None:
            raise RequestError(None, "this service serves no CLDM model (serve.cldm_model)", status=404)
        if self._cldm_info is None:
            self._cldm_info = await self._model_call("info", deployment=self.cldm)
        return self._cldm_info

    def _limits(self) -> dict[str, Any]:
        names = ("max_samples", "max_steps", "max_horizon_days", "max_upload_mb", "max_uncompressed_mb", "max_voxels")
        return {name: getattr(self.cfg, name) for name in names}

    async def _model_call(self, method: str, *args, deployment=None):
        try:
            return await getattr(deployment or self.model, method).remote(*args)
        except Exception as exc:
            if _unavailable(exc):
                raise RequestError(None, "the model deployment is unavailable; retry later", status=503) from None
            raise

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", responses=_errors(401, 422, 503), dependencies=AUTHORIZED)
    async def model_info(self) -> dict[str, Any]:
        return {**await self.info(), "cohortcast_version": __version__, "limits": self._limits()}

    @app.get("/v1/cldm/model", responses=_errors(401, 404, 422, 503), dependencies=AUTHORIZED)
    async def cldm_model_info(self) -> dict[str, Any]:
        return {**await self.cldm_info(), "cohortcast_version": __version__, "limits": self._limits()}

    @app.post(
        "/v1/cldm/forecast",
        responses={200: {"model": CLDMForecastAnswer}, **_errors(400, 401, 404, 413, 422, 503)},
        dependencies=AUTHORIZED,
    )
    async def cldm_forecast(self, request: CLDMForecastRequest):
        info = await self.cldm_info()
        item = await run_in_threadpool(prepare_cldm, request, info, self.cfg)
        forecast = await self._model_call("forecast", item, deployment=self.cldm)
        return await run_in_threadpool(cldm_answer, item, forecast)

    @app.post(
        "/v1/forecast",
        responses={200: {"model": ForecastAnswer}, **_errors(400, 401, 422, 503)},
        dependencies=AUTHORIZED,
    )
    async def forecast(self, request: ForecastRequest):
        info = await self.info()
        item = await run_in_threadpool(prepare, request, tuple(info["crop_shape"]), self.cfg, info["uses_ehr"])
        result = await self._model_call("forecast", item)
        return await run_in_threadpool(forecast_answer, item, result)

    @app.post(
        "/v1/forecast/study",
        responses={
            200: {"model": StudyForecastAnswer, "content": {"application/zip": {}}},
            **_errors(400, 401, 413, 422, 503),
        },
        dependencies=AUTHORIZED,
    )
    async def forecast_study(
        self,
        study: list[UploadFile] = File(
            description="one NIfTI file, or the DICOM files of one series (files or .zip archives)"
        ),
        request: str = Form(
            description="JSON: StudyForecastRequest (centre, horizon_days, ehr, num_samples, steps, seed)"
        ),
        output_format: Literal["json", "nifti"] = Query(
            "json",
            alias="format",
            description="nifti: a .zip of mean/variance/samples .nii.gz (HU) on the study's grid",
        ),
    ):
        settings = _study_settings(request)
        info = await self.info()
        # Crop geometry and intensity scaling: the model's own (ingest only for old bundles).
        geometry, problem = study_preprocessing(info, self.ingest)
        if problem:
            raise RequestError(None, problem, status=503)
        limit = int(self.cfg.max_upload_mb * 2**20)
        uploads = await _read_bounded(study, limit)
        # File IO, decompression and resampling block: off the event loop.
        cut = await run_in_threadpool(study_crop, uploads, settings, geometry, limit, StudyLimits.from_config(self.cfg))
        item = await run_in_threadpool(
            prepare_crop, cut.crop, settings, tuple(info["crop_shape"]), self.cfg, info["uses_ehr"], "study"
        )
        result = await self._model_call("forecast", item)
        if output_format == "nifti":
            payload = await run_in_threadpool(
                nifti_zip, result["mean"], result["variance"], result["samples"], cut.affine, geometry
            )
            return Response(
                payload,
                media_type="application/zip",
                headers={"Content-Disposition": f'attachment; filename="forecast-{item.case_id}.zip"'},
            )
        answer = await run_in_threadpool(forecast_answer, item, result)
        return {
            **answer,
            "center_lps_mm": [float(v) for v in cut.center_lps_mm],
            "crop_spacing_mm": geometry.crop_spacing_mm,
        }

    @app.post(
        "/v1/cohorts",
        status_code=202,
        responses={202: {"model": CohortJob}, **_errors(400, 401, 403, 422, 503)},
        dependencies=AUTHORIZED,
    )
    async def submit(self, request: CohortRequest):
        return await run_in_threadpool(submit_cohort, self.jobs, request, self.cfg, self.llm_path)

    @app.get(
        "/v1/cohorts/{job_id}",
        responses={200: {"model": CohortStatus}, **_errors(401, 404, 422, 503)},
        dependencies=AUTHORIZED,
    )
    async def status(self, job_id: str):
        answer = await run_in_threadpool(cohort_status, self.jobs, job_id, self.cfg)
        if answer is None:
            raise RequestError("job_id", "no such cohort job", status=404)
        return answer


def build_app(cfg: ServeConfig, llm_path: str | None = None, token: str | None = None, ingest=None):
    """The Serve application: ForecastAPI (ingress) -> ForecastModel (batching), and
    CLDMModel (batching) when `cfg.cldm_model` names a CLDM training output.
    `ingest`: how uploaded studies are cropped for a Forecaster saved without its own
    crop preprocessing (format 2; IngestConfig, default: the factory settings)."""
    from cohortcast.config import IngestConfig
    from cohortcast.serving.forecast_model import ForecastModel

    scaling = (
        {"autoscaling_config": cfg.autoscaling.serve_options()}
        if cfg.autoscaling.enabled
        else {"num_replicas": cfg.num_replicas}
    )
    options = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": max(cfg.max_batch_size * 2, cfg.max_ongoing_requests),
        **scaling,
    }
    model = serve.deployment(ForecastModel, name="ForecastModel").options(**options).bind(cfg.forecaster, llm_path, cfg)
    cldm = None
    if cfg.cldm_model:
        from cohortcast.serving.cldm_model import CLDMModel

        cldm = serve.deployment(CLDMModel, name="CLDMModel").options(**options).bind(cfg.cldm_model, cfg)
    front = serve.deployment(ForecastAPI, name="ForecastAPI").options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
    )
    return front.bind(model, cfg, token, llm_path, ingest or IngestConfig(), cldm)
