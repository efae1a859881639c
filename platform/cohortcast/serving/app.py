"""The HTTP front door (FastAPI on Ray Serve): validation, authentication, JSON.

    GET  /healthz        liveness
    GET  /v1/model       which Forecaster, its version (training stage key), input shape
    POST /v1/forecast    a crop + EHR + horizon + samples + seed -> mean, variance, samples
    POST /v1/forecast/study  a NIfTI / DICOM upload + nodule centre + the same settings ->
                         the same JSON, or (?format=nifti) a .zip of NIfTI files on the
                         study's patient-space grid
    POST /v1/cohorts     an ingested cohort -> a job id (a Ray job runs the batch forecast)
    GET  /v1/cohorts/ID  the job's status and where its results are
    GET  /docs           OpenAPI documentation
"""

# No `from __future__ import annotations`: Serve rebuilds the routes inside the replica,
# where string annotations of the request models no longer resolve (OpenAPI then fails).

import hmac
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Header, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from starlette.concurrency import run_in_threadpool

from cohortcast import __version__
from cohortcast.config.serving import ServeConfig
from cohortcast.serving.cohort_jobs import CohortRequest, cohort_status, submit_cohort
from cohortcast.serving.model_source import study_preprocessing
from cohortcast.serving.requests import ForecastRequest, RequestError, forecast_answer, prepare, prepare_crop
from cohortcast.serving.studies import StudyForecastRequest, Upload, nifti_zip, study_crop

app = FastAPI(title="cohortcast forecasting", version=__version__,
              description="Seeded multi-sample DDIM forecasts of a nodule crop at a future date (NAMD).")


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "field": field})


async def _read_bounded(files: list[UploadFile], limit: int) -> list[Upload]:
    """Read uploads in chunks, refusing (413) past `limit` bytes instead of holding an
    arbitrarily large body in memory first."""
    uploads, total = [], 0
    for upload in files:
        chunks = []
        while chunk := await upload.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise RequestError("study", f"uploads exceed the limit of {limit / 2**20:.0f} MiB", status=413)
            chunks.append(chunk)
        uploads.append(Upload(upload.filename or "", b"".join(chunks)))
    return uploads


@serve.ingress(app)
class ForecastAPI:
    def __init__(self, model, cfg: ServeConfig, token: str | None, llm_path: str | None, ingest):
        self.model, self.cfg, self.token, self.llm_path, self.ingest = model, cfg, token, llm_path, ingest
        self._info: dict[str, Any] | None = None
        self._jobs = None

    def jobs(self):
        if self._jobs is None:
            from ray.job_submission import JobSubmissionClient

            self._jobs = JobSubmissionClient(self.cfg.jobs_address)
        return self._jobs

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    def _denied(self, authorization: str | None) -> JSONResponse | None:
        if self.token is None:
            return None
        expected = f"Bearer {self.token}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected.encode()):
            return _error(401, "Authorization", "missing or wrong bearer token")
        return None

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info(self, authorization: str | None = Header(default=None)):
        return self._denied(authorization) or {**await self.info(), "cohortcast_version": __version__,
                                               "limits": {"max_samples": self.cfg.max_samples,
                                                          "max_steps": self.cfg.max_steps}}

    @app.post("/v1/forecast")
    async def forecast(self, request: ForecastRequest, authorization: str | None = Header(default=None)):
        denied = self._denied(authorization)
        if denied:
            return denied
        info = await self.info()
        try:
            item = prepare(request, tuple(info["crop_shape"]), self.cfg, info["uses_ehr"])
        except RequestError as exc:
            return _error(exc.status, exc.field, exc.message)
        return forecast_answer(item, await self.model.forecast.remote(item))

    @app.post("/v1/forecast/study", responses={200: {"content": {"application/zip": {}}}})
    async def forecast_study(
            self, study: list[UploadFile] = File(description="one NIfTI file, or the DICOM files of one series "
                                                             "(files or .zip archives)"),
            request: str = Form(description="JSON: StudyForecastRequest (centre, horizon_days, ehr, num_samples, "
                                            "steps, seed)"),
            output_format: Literal["json", "nifti"] = Query(
                "json", alias="format", description="nifti: a .zip of mean/variance/samples .nii.gz (HU) on the "
                                                    "study's grid"),
            authorization: str | None = Header(default=None)):
        denied = self._denied(authorization)
        if denied:
            return denied
        try:
            settings = StudyForecastRequest.model_validate_json(request)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            return _error(422, f"request.{where}" if first["loc"] else "request", first["msg"])
        info = await self.info()
        # Crop geometry and intensity scaling: the model's own (ingest only for old bundles).
        geometry, problem = study_preprocessing(info, self.ingest)
        if problem:
            return _error(500, "ingest.crop_size", problem)
        limit = int(self.cfg.max_upload_mb * 2**20)
        try:
            uploads = await _read_bounded(study, limit)
            # File IO and resampling block: off the event loop.
            cut = await run_in_threadpool(study_crop, uploads, settings, geometry, limit)
            item = prepare_crop(cut.crop, settings, tuple(info["crop_shape"]), self.cfg, info["uses_ehr"], "study")
        except RequestError as exc:
            return _error(exc.status, exc.field, exc.message)
        result = await self.model.forecast.remote(item)
        if output_format == "nifti":
            payload = await run_in_threadpool(nifti_zip, result["mean"], result["variance"], result["samples"],
                                              cut.center_lps_mm, geometry)
            return Response(payload, media_type="application/zip", headers={
                "Content-Disposition": f'attachment; filename="forecast-{item.case_id}.zip"'})
        return {**forecast_answer(item, result), "center_lps_mm": [float(v) for v in cut.center_lps_mm],
                "crop_spacing_mm": geometry.crop_spacing_mm}

    @app.post("/v1/cohorts", status_code=202)
    async def submit(self, request: CohortRequest, authorization: str | None = Header(default=None)):
        denied = self._denied(authorization)
        if denied:
            return denied
        try:
            return submit_cohort(self.jobs(), request, self.cfg, self.llm_path)
        except RequestError as exc:
            return _error(exc.status, exc.field, exc.message)

    @app.get("/v1/cohorts/{job_id}")
    async def status(self, job_id: str, authorization: str | None = Header(default=None)):
        denied = self._denied(authorization)
        if denied:
            return denied
        answer = cohort_status(self.jobs(), job_id, self.cfg)
        return answer if answer is not None else _error(404, "job_id", f"no cohort job {job_id!r}")


def build_app(cfg: ServeConfig, llm_path: str | None = None, token: str | None = None, ingest=None):
    """The Serve application: ForecastAPI (ingress) -> ForecastModel (batching).
    `ingest`: how uploaded studies are cropped for a Forecaster saved without its own
    crop preprocessing (format 2; IngestConfig, default: the factory settings)."""
    from cohortcast.config import IngestConfig
    from cohortcast.serving.forecast_model import ForecastModel

    scaling = ({"autoscaling_config": cfg.autoscaling.serve_options()} if cfg.autoscaling.enabled
               else {"num_replicas": cfg.num_replicas})
    model = serve.deployment(ForecastModel, name="ForecastModel").options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=max(cfg.max_batch_size * 2, cfg.max_ongoing_requests), **scaling,
    ).bind(cfg.forecaster, llm_path, cfg)
    front = serve.deployment(ForecastAPI, name="ForecastAPI").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests)
    return front.bind(model, cfg, token, llm_path, ingest or IngestConfig())
