"""Fakes for in-process service tests (no Ray, no network): a Forecaster stand-in that
run_batch can drive (optionally slow), a replica-context stub so `@serve.batch` works
outside a replica, and a fake Ray job client."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cohortcast.config.serving import ServeConfig
from cohortcast.serving.requests import encode_npy

SIDE = 8
CFG = ServeConfig(
    default_samples=2, max_samples=4, default_steps=3, max_steps=5, max_batch_size=4, batch_wait_timeout_s=0.01
)


class FakeForecaster:
    """What run_batch and ForecastModel.info use of a Forecaster; `delay` seconds of
    blocking work per call (a stand-in for DDIM), the calling threads recorded."""

    conditioner = None
    preprocessing = None  # a Forecaster saved before its crop settings were (format 2)

    def __init__(self, delay: float = 0.0):
        self.delay, self.threads = delay, []
        self.cfg = SimpleNamespace(vae=SimpleNamespace(sample_size=SIDE), scheduler=SimpleNamespace(micro_batch=4))

    def forecast(self, crops, horizons, case_ids, ehr=None, num_samples=2, seed=0, steps=3, sampler=None):
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)
        base = crops.float()  # (B, 1, H, W)
        samples = base[:, None].repeat(1, num_samples, 1, 1, 1) * 0.5
        return SimpleNamespace(mean=samples.mean(1), variance=samples.var(1, unbiased=False) + 0.01, samples=samples)


class FakeSource:
    def info(self):
        return {"forecaster": "fake", "model_version": None, "mlflow_run_id": None, "registered_model": None}


class FakeDeployment:
    """A model deployment answering instantly (or raising `error`), for API-level tests."""

    def __init__(self, error: Exception | None = None, side: int = SIDE):
        self.error, self.side = error, side

    def info(self):
        return {**FakeSource().info(), "crop_shape": [self.side, self.side], "uses_ehr": True, "evaluator": False}

    async def forecast(self, item):
        if self.error is not None:
            raise self.error
        samples = np.repeat(item.crop[None], item.num_samples, 0) * 0.5
        return {"mean": samples.mean(0), "variance": samples.var(0) + 0.01, "samples": samples}


class FakeJobs:
    """Ray's JobSubmissionClient as the service uses it: submit_job, get_job_info."""

    def __init__(
        self, status: str = "RUNNING", message: str = "Job is currently running.", fail: Exception | None = None
    ):
        self.submitted, self.asked = [], []
        self.status, self.message, self.fail = status, message, fail

    def submit_job(self, entrypoint, submission_id, metadata):
        if self.fail:
            raise self.fail
        self.submitted.append((submission_id, entrypoint))
        return submission_id

    def get_job_info(self, job_id):
        self.asked.append(job_id)
        if self.fail:
            raise self.fail
        if job_id not in {s for s, _ in self.submitted}:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return SimpleNamespace(status=SimpleNamespace(value=self.status), message=self.message)


@pytest.fixture
def replica_context(monkeypatch):
    """`@serve.batch` asks the replica context for max_ongoing_requests; outside Serve
    there is none, so give it one."""
    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=100))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return context


def crop_body(value: float = 0.1, **kw) -> dict:
    crop = np.full((SIDE, SIDE), value, np.float32)
    return {"crop_npy_b64": encode_npy(crop), "horizon_days": 365, "seed": 0, "ehr": {"age": 61}, **kw}


def fake_model(delay: float = 0.0, cfg: ServeConfig = CFG):
    from cohortcast.serving.forecast_model import ForecastModel

    torch.manual_seed(0)
    return ForecastModel.from_loaded(FakeForecaster(delay), FakeSource(), cfg)
