"""The CLDM model deployment: one CLDMBundle per replica, dynamic batching across requests.

As for the NAMD deployment (serving/forecast_model.py): `@serve.batch` hands a list of
prepared requests to `run_cldm_batch`, which groups them by (kind, method, samples,
steps) and forecasts each group in one bundle call whatever their seeds (every sample
has its own seeded noise and the bundle runs fixed micro-batches, so an answer does not
depend on its batch); equal requests are computed once. The bundle runs in a worker
thread, never on the replica's event loop."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from ray import serve

from cohortcast.config.serving import ServeConfig
from cohortcast.serving.cldm_requests import PreparedCLDMRequest


def run_cldm_batch(bundle, items: list[PreparedCLDMRequest]) -> list:
    """Prepared requests -> their CaseForecasts (models.cldm_bundle), in order."""
    groups: dict[tuple, dict[tuple, PreparedCLDMRequest]] = defaultdict(dict)
    for item in items:
        groups[item.group][(item.case_id, item.seed)] = item
    answers: dict[tuple, Any] = {}
    for (kind, method, samples, steps, sampler), unique in groups.items():
        cases = list(unique.values())
        masks = [c.last_prior_mask for c in cases]
        forecasts = bundle.forecast(
            [c.priors for c in cases],
            [c.case_id for c in cases],
            num_samples=samples,
            seed=[c.seed for c in cases],
            steps=steps,
            sampler=sampler,
            kind=kind,
            voxel_ml=[c.voxel_ml for c in cases],
            method=method,
            prior_masks=masks if any(m is not None for m in masks) else None,
        )
        for case, forecast in zip(cases, forecasts):
            answers[(*case.group, case.case_id, case.seed)] = forecast
    return [answers[(*i.group, i.case_id, i.seed)] for i in items]


class CLDMModel:
    def __init__(self, training_output: str, cfg: ServeConfig):
        from cohortcast.models.cldm_bundle import CLDMBundle

        self._setup(CLDMBundle.load(Path(training_output)), cfg)

    @classmethod
    def from_loaded(cls, bundle, cfg: ServeConfig) -> CLDMModel:
        """A replica around an already loaded bundle (in-process use: tests, benchmarks)."""
        self = cls.__new__(cls)
        self._setup(bundle, cfg)
        return self

    def _setup(self, bundle, cfg: ServeConfig) -> None:
        from ray.util import metrics

        self.bundle = bundle
        self.requests = metrics.Counter("cohortcast_cldm_requests", description="CLDM forecast requests answered")
        self.batch_seconds = metrics.Histogram(
            "cohortcast_cldm_batch_seconds",
            description="wall time of one CLDM model batch",
            boundaries=[0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        )
        # A batch queue per instance (`@serve.batch` on the class body keeps one per class,
        # bound to the event loop of its first call): in a replica there is one instance
        # and one loop either way; in process (tests, benchmarks) each instance gets its own.
        self._batched = serve.batch(
            max_batch_size=int(cfg.max_batch_size), batch_wait_timeout_s=float(cfg.batch_wait_timeout_s)
        )(self._run_in_thread)
        if cfg.micro_batch:
            self.bundle.forecaster.cfg.scheduler.micro_batch = int(cfg.micro_batch)

    def check_health(self) -> None:
        if self.bundle is None:
            raise RuntimeError("the CLDM bundle is not loaded")

    def info(self) -> dict[str, Any]:
        return self.bundle.info()

    async def forecast(self, item: PreparedCLDMRequest):
        return await self._batched(item)

    def _compute(self, items: list[PreparedCLDMRequest]) -> list:
        started = time.perf_counter()
        answers = run_cldm_batch(self.bundle, items)
        self.batch_seconds.observe(time.perf_counter() - started)
        self.requests.inc(len(items))
        return answers

    async def _run_in_thread(self, items: list[PreparedCLDMRequest]) -> list:
        return await asyncio.to_thread(self._compute, items)
