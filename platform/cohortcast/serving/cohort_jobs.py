"""Cohort forecasts through the service: a request becomes a Ray job running the batch
forecasting job (`cohortcast forecast`) on the cluster; its status comes from Ray's job
API, so it survives a restart of the service's replicas."""

from __future__ import annotations

import shlex
import sys
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cohortcast.config.serving import ServeConfig
from cohortcast.serving.requests import RequestError, sampling_limits


class CohortRequest(BaseModel):
    ingested: str = Field(description="an ingested cohort folder on the cluster's storage (holds card.json)")
    split: Literal["train", "val", "test"] = "test"
    num_samples: int | None = Field(default=None, description="samples per case (default: the service's)")
    steps: int | None = Field(default=None, description="DDIM steps (default: the service's)")
    seed: int = Field(default=0, ge=0)


def cohort_command(request: CohortRequest, cfg: ServeConfig, llm_path: str | None, output: Path) -> str:
    """The job's entrypoint: the batch forecasting command with everything set explicitly."""
    samples, steps = sampling_limits(request.num_samples, request.steps, cfg)
    if not (Path(request.ingested) / "card.json").is_file():
        raise RequestError("ingested", f"{request.ingested} is not an ingested cohort (no card.json)")
    settings = {"forecast.forecaster": cfg.forecaster, "forecast.ingested": request.ingested,
                "forecast.split": request.split, "forecast.output": str(output), "forecast.num_samples": samples,
                "forecast.inference_steps": steps, "forecast.seed": request.seed}
    if llm_path:
        settings["model.conditioner.llm_path"] = llm_path
    # The replica's own interpreter: the job driver then imports the same cohortcast.
    args = [sys.executable, "-m", "cohortcast", "forecast"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return shlex.join(args)


def submit_cohort(client, request: CohortRequest, cfg: ServeConfig, llm_path: str | None) -> dict[str, Any]:
    job_id = f"cohort-{uuid.uuid4().hex[:12]}"
    output = Path(cfg.cohort_output) / job_id
    command = cohort_command(request, cfg, llm_path, output)
    client.submit_job(entrypoint=command, submission_id=job_id, metadata={"cohortcast": "cohort-forecast"})
    return {"job_id": job_id, "status": "PENDING", "output": str(output)}


def cohort_status(client, job_id: str, cfg: ServeConfig) -> dict[str, Any] | None:
    import json

    try:
        info = client.get_job_info(job_id)
    except Exception:  # unknown id: the job API raises a RuntimeError carrying a 404
        return None
    output = Path(cfg.cohort_output) / job_id
    summary = output / "summary.json"
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "output": str(output), "message": info.message,
            "summary": json.loads(summary.read_text()) if summary.is_file() else None}
