"""Logging from inside a Ray Train worker loop into the stage's MLflow child run.

The driver creates the run and hands `{"uri", "run_id"}` to the workers; only world
rank 0 builds a tracker, so a metric is written once however many workers train.
Failures to log are warned about, never fatal: a flaky tracking server must not kill
a multi-hour training run (the metrics also go to Ray Train's reports). It is part of
training, not tracking, because the stage loop needs it and training sits below tracking."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class StageTracker:
    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    @classmethod
    def for_rank(cls, tracking: dict[str, str] | None, rank: int) -> StageTracker | None:
        return cls(tracking["uri"], tracking["run_id"]) if (tracking and rank == 0) else None

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        try:
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001 - see module docstring
            log.warning("MLflow: could not log %d metrics at step %d: %s", len(batch), step, exc)

    def log_png(self, image: np.ndarray, artifact_file: str) -> None:
        """uint8 (H, W) or (H, W, 3) -> PNG artifact."""
        try:
            self.client.log_image(self.run_id, image, artifact_file)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log %s: %s", artifact_file, exc)
