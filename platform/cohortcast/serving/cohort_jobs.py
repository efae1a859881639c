"""Cohort forecasts through the service: a request becomes a Ray job running the batch
forecasting job (`cohortcast forecast`) on the cluster; its status comes from Ray's job
API, so it survives a restart of the service's replicas.

Confinement: a request names an ingested cohort folder, and the job reads whatever the
cluster can read; so only folders at or under `serve.cohort_roots` are accepted (the
path is resolved, symlinks and `..` included, before the check), and none when that
list is empty. Answers never carry server paths: results are named by job id, relative
to `serve.cohort_output`, and Ray's job messages are cut before their log tail.

Everything here blocks (file checks, HTTP to the job server): the ingress calls it from
a worker thread."""

from __future__ import annotations

import json
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cohortcast.config.serving import ServeConfig
from cohortcast.serving.requests import SEED_MAX, RequestError, choose_sampler, sampling_limits, shown

JOB_ID = re.compile(r"cohort-[0-9a-f]{12}")  # what submit_cohort issues; anything else is no cohort job


class CohortRequest(BaseModel):
    ingested: str = Field(
        description="an ingested cohort folder (holds card.json) at or under one of the service's "
        "serve.cohort_roots: absolute, or relative to a root"
    )
    split: Literal["train", "val", "test"] = "test"
    num_samples: int | None = Field(default=None, description="samples per case (default: the service's)")
    steps: int | None = Field(default=None, description="sampler steps (default: the service's)")
    sampler: Literal["ddim", "dpmsolver++"] | None = Field(
        default=None, description="ddim or dpmsolver++ (default: the service's serve.default_sampler)"
    )
    seed: int = Field(default=0, ge=0, le=SEED_MAX)


class CohortJob(BaseModel):
    job_id: str
    status: str = Field(description="Ray job status: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED")
    output: str = Field(description="the results folder, relative to the service's serve.cohort_output")


class CohortStatus(CohortJob):
    message: str | None = Field(default=None, description="Ray's status message (first line only)")
    summary: dict[str, Any] | None = Field(default=None, description="the finished run's summary.json")


def jobs_unavailable(reason: str | None = None) -> RequestError:
    if reason:  # the job server answered, but refused (e.g. "No available agent to submit job")
        return RequestError(None, f"cohort jobs are unavailable: Ray's job server refused: {reason}", status=503)
    return RequestError(
        None,
        "cohort jobs are unavailable: this service cannot reach Ray's job server (the Ray "
        "dashboard); start Ray with its dashboard (`cohortcast serve` does) or set "
        "serve.jobs_address",
        status=503,
    )


def job_client(address: str | None):
    """Ray's job client; 503 when there is no job server to talk to (a Ray started
    without its dashboard, a wrong serve.jobs_address, ray[default] not installed)."""
    try:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(address)
    except Exception:  # ConnectionError, RuntimeError (404 on /api/version), ImportError...
        raise jobs_unavailable() from None


def confined_cohort(ingested: str, roots: list[str]) -> Path:
    """The requested folder, resolved, if it lies at or under a configured root; 403
    otherwise (before any existence check, so refused paths reveal nothing)."""
    if not roots:
        raise RequestError(
            "ingested", "cohort submission is disabled on this service (serve.cohort_roots is empty)", status=403
        )
    try:
        for root in roots:
            base = Path(root).resolve()
            path = (base / ingested).resolve()  # an absolute `ingested` replaces the root
            if path == base or base in path.parents:
                if not (path / "card.json").is_file():
                    raise RequestError("ingested", f"{shown(ingested, 300)} is not an ingested cohort (no card.json)")
                return path
    except RequestError:
        raise
    except (OSError, ValueError):  # embedded NUL, names too long, loops
        raise RequestError("ingested", f"{shown(ingested, 300)} is not a usable path") from None
    raise RequestError(
        "ingested", f"{shown(ingested, 300)} is not under a folder this service allows (serve.cohort_roots)", status=403
    )


def cohort_command(request: CohortRequest, cfg: ServeConfig, llm_path: str | None, output: Path) -> str:
    """The job's entrypoint: the batch forecasting command with everything set explicitly."""
    samples, steps = sampling_limits(request.num_samples, request.steps, cfg)
    ingested = confined_cohort(request.ingested, cfg.cohort_roots)
    settings = {
        "forecast.forecaster": cfg.forecaster,
        "forecast.ingested": str(ingested),
        "forecast.split": request.split,
        "forecast.output": str(output),
        "forecast.num_samples": samples,
        "forecast.inference_steps": steps,
        "forecast.sampler": choose_sampler(request.sampler, cfg),
        "forecast.seed": request.seed,
    }
    if llm_path:
        settings["model.conditioner.llm_path"] = llm_path
    # The replica's own interpreter: the job driver then imports the same cohortcast.
    args = [sys.executable, "-m", "cohortcast", "forecast"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return shlex.join(args)


def submit_cohort(client_factory, request: CohortRequest, cfg: ServeConfig, llm_path: str | None) -> dict[str, Any]:
    """Validate, then submit; `client_factory()` gives the job client (only asked once
    the request is valid, so a bad request is a 4xx even without a job server)."""
    job_id = f"cohort-{uuid.uuid4().hex[:12]}"
    command = cohort_command(request, cfg, llm_path, Path(cfg.cohort_output) / job_id)
    client = client_factory()
    try:
        client.submit_job(entrypoint=command, submission_id=job_id, metadata={"cohortcast": "cohort-forecast"})
    except RuntimeError as exc:  # the job server refused: its reason, first line only (no log tail)
        raise jobs_unavailable(_first_line(str(exc))) from None
    except Exception:  # the job server went away: not the client's fault
        raise jobs_unavailable() from None
    return {"job_id": job_id, "status": "PENDING", "output": job_id}


def _first_line(message: str | None) -> str | None:
    """Ray's message without its log tail (which may hold server paths or data)."""
    if not message:
        return None
    line = message.splitlines()[0].split(", last available logs", 1)[0]
    return line[:200]


def _summary(output: Path) -> dict[str, Any] | None:
    try:
        return json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):  # not written yet (or mid-way)
        return None


def cohort_status(client_factory, job_id: str, cfg: ServeConfig) -> dict[str, Any] | None:
    """The job's status, or None for an id that is not a cohort job of this service."""
    if not JOB_ID.fullmatch(job_id):  # never forward arbitrary text into the job API's URL
        return None
    client = client_factory()
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as exc:
        if "status code 404" in str(exc):
            return None
        raise jobs_unavailable() from None
    except Exception:  # connection lost mid-way
        raise jobs_unavailable() from None
    status = info.status.value if hasattr(info.status, "value") else info.status
    return {
        "job_id": job_id,
        "status": str(status),
        "output": job_id,
        "message": _first_line(info.message),
        "summary": _summary(Path(cfg.cohort_output) / job_id),
    }
