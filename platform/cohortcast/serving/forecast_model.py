"""The model deployment: one Forecaster per replica, dynamic batching across requests.

`@serve.batch` hands a list of requests to `run_batch`, which groups them by (samples,
steps) and runs each group as one Forecaster call, whatever their seeds: every sample
has its own seeded noise and runs in fixed-size micro-batches (the Forecaster's
bit-identity guarantee), so a request's answer does not depend on what else is in the
batch. `serve.micro_batch` sets those rows per network call: about max_batch_size x
samples keeps a full batch in one call; with batching off, the samples per request.

The network runs in a worker thread (`asyncio.to_thread`), never on the replica's event
loop: while a batch computes, the replica still takes new requests into the next batch
and answers Serve's health checks. `@serve.batch` runs one batch at a time per replica,
so the Forecaster is never used by two threads at once."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import numpy as np
from ray import serve

from cohortcast.config.serving import ServeConfig
from cohortcast.serving.requests import PreparedRequest


def run_batch(model, items: list[PreparedRequest]) -> list[dict[str, Any]]:
    import torch

    groups: dict[tuple, dict[tuple, PreparedRequest]] = defaultdict(dict)
    for item in items:  # equal requests (same content and seed) are computed once
        groups[(item.num_samples, item.steps, item.sampler)][(item.case_id, item.seed)] = item
    answers: dict[tuple, dict[str, Any]] = {}
    for (samples, steps, sampler), unique in groups.items():
        cases = list(unique.values())  # seeds may differ: each case's noise comes from its own seed
        records = [c.ehr for c in cases] if model.conditioner is not None else None
        forecast = model.forecast(
            torch.from_numpy(np.stack([c.crop for c in cases]))[:, None],
            torch.tensor([c.horizon_days for c in cases]),
            [c.case_id for c in cases],
            ehr=records,
            num_samples=samples,
            seed=[c.seed for c in cases],
            steps=steps,
            sampler=sampler,
        )
        for i, case in enumerate(cases):
            answers[(samples, steps, sampler, case.case_id, case.seed)] = {
                "mean": forecast.mean[i, 0].numpy(),
                "variance": forecast.variance[i, 0].numpy(),
                "samples": forecast.samples[i, :, 0].numpy(),
            }
    return [answers[(i.num_samples, i.steps, i.sampler, i.case_id, i.seed)] for i in items]


def score_samples(evaluator, answers: list[dict[str, Any]], micro_batch: int = 64) -> None:
    """Adds each answer's per-sample malignancy probabilities (the NAMD Sec. 4.1.2
    evaluator on every forecast sample), in place; one pass over the batch's samples."""
    import torch

    answers = list({id(a): a for a in answers}.values())  # duplicate requests share one answer
    stacked = torch.from_numpy(np.concatenate([a["samples"] for a in answers]))[:, None]
    with torch.no_grad():
        probabilities = torch.cat([torch.sigmoid(evaluator(chunk)) for chunk in stacked.split(micro_batch)]).numpy()
    start = 0
    for answer in answers:
        count = len(answer["samples"])
        answer["malignancy_probability"] = probabilities[start : start + count].astype(float).tolist()
        start += count


class ServiceMetrics:
    """Application metrics (ray.util.metrics -> Ray's Prometheus endpoint, next to
    Serve's own); the Grafana dashboard in dashboards/ plots them."""

    def __init__(self):
        from ray.util import metrics

        self.samples = metrics.Counter("cohortcast_samples_generated", description="forecast samples generated")
        self.requests = metrics.Counter("cohortcast_forecast_requests", description="forecast requests answered")
        self.step_latency = metrics.Histogram(
            "cohortcast_ddim_step_seconds",
            description="wall time of one DDIM step of a whole batch",
            boundaries=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
        )
        self.batch_size = metrics.Histogram(
            "cohortcast_batch_requests", description="requests per model batch", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self.in_flight = metrics.Gauge(
            "cohortcast_requests_in_flight", description="requests inside the model deployment (queued + batched)"
        )


BATCH_SETTINGS = ("max_batch_size", "batch_wait_timeout_s", "micro_batch")


class ForecastModel:
    def __init__(self, forecaster: str, llm_path: str | None, cfg: ServeConfig):
        from cohortcast.models.forecaster import Forecaster
        from cohortcast.serving.model_source import resolve_forecaster

        source = resolve_forecaster(forecaster)
        evaluator = None
        if cfg.evaluator:
            from cohortcast.models.evaluator import MalignancyEvaluator

            evaluator = MalignancyEvaluator.load(cfg.evaluator)
        self._setup(Forecaster.load(source.folder, llm_path=llm_path), source, evaluator, cfg)

    @classmethod
    def from_loaded(cls, model, source, cfg: ServeConfig, evaluator=None) -> ForecastModel:
        """A replica around an already loaded Forecaster (in-process use: tests, load smoke runs)."""
        self = cls.__new__(cls)
        self._setup(model, source, evaluator, cfg)
        return self

    def _setup(self, model, source, evaluator, cfg: ServeConfig) -> None:
        self.model, self.source, self.evaluator = model, source, evaluator
        self.metrics = ServiceMetrics()
        self._in_flight = 0
        self.reconfigure({name: getattr(cfg, name) for name in BATCH_SETTINGS})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's `user_config` hook: batching settings change on a live replica, without
        reloading the model (e.g. `user_config: {max_batch_size: 16}` in a Serve config)."""
        unknown = set(config) - set(BATCH_SETTINGS)
        if unknown:
            raise ValueError(f"ForecastModel user_config: unknown keys {sorted(unknown)}; known: {BATCH_SETTINGS}")
        if config.get("micro_batch"):
            self.model.cfg.scheduler.micro_batch = int(config["micro_batch"])
        if "max_batch_size" in config:
            self._batched.set_max_batch_size(int(config["max_batch_size"]))
        if "batch_wait_timeout_s" in config:
            self._batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose model is gone is restarted. It
        answers even mid-batch, because batches run off the event loop."""
        if self.model is None:
            raise RuntimeError("the Forecaster is not loaded")

    def info(self) -> dict[str, Any]:
        side = self.model.cfg.vae.sample_size
        preprocessing = self.model.preprocessing
        return {
            **self.source.info(),
            "crop_shape": [side, side],
            "uses_ehr": self.model.conditioner is not None,
            "evaluator": self.evaluator is not None,
            "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
        }

    async def forecast(self, item: PreparedRequest) -> dict[str, Any]:
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            return await self._batched(item)
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)

    def _compute(self, items: list[PreparedRequest]) -> tuple[list[dict[str, Any]], float]:
        """Blocking: DDIM over the batch (its wall time returned), then the evaluator;
        runs in a worker thread (metrics are recorded back on the event loop)."""
        started = time.perf_counter()
        answers = run_batch(self.model, items)
        seconds = time.perf_counter() - started
        if self.evaluator is not None:
            score_samples(self.evaluator, answers)
        return answers, seconds

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[PreparedRequest]) -> list[dict[str, Any]]:
        answers, seconds = await asyncio.to_thread(self._compute, items)
        steps = sum({(i.num_samples, i.steps): i.steps for i in items}.values())
        self.metrics.step_latency.observe(seconds / max(steps, 1))
        self.metrics.batch_size.observe(len(items))
        self.metrics.requests.inc(len(items))
        self.metrics.samples.inc(sum(i.num_samples for i in items))
        return answers
