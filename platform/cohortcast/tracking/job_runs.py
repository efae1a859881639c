"""The job's MLflow layout: one parent run per job, one child run per stage.

Tracking URI: MLFLOW_TRACKING_URI (environment) > `mlflow.tracking_uri` > a local store
under the working directory (`<workdir>/mlruns/mlflow.db`, artifacts beside it). Runs
carry pseudonymous ids only: params are the config (paths, sizes, weights), metrics
are losses, artifacts are the config, dataset cards (pseudonymised) and images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from cohortcast.config import dump_yaml, flatten
from cohortcast.config.schema import CohortcastConfig

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STATUS_TAG = "cohortcast.stage_status"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def local_store(workdir: str | Path) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded store under `workdir`."""
    root = Path(workdir).resolve() / "mlruns"
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def resolve_tracking_uri(cfg: CohortcastConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri or local_store(cfg.workdir)[0]


def _params(values: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in values.items()}


def _set_tracking_uri_without_leaking(mlflow, uri: str) -> None:
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to this process's
    environment. In a reused Ray worker that export outlives the task and would make
    the next job in that worker log to the previous job's store (MLFLOW_TRACKING_URI
    wins in resolve_tracking_uri), so the environment is put back as it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


class JobRuns:
    """Context manager: the parent run is active inside `with`; stages open children.
    `nested_in`: open the job's run as a child of that run (a sweep trial under its
    sweep); `run_name` and `tags` default to the config's run name and none;
    `resume_run_id`: reopen that run (a resumed sweep keeps one parent run);
    `tracking_uri`: log there instead of resolving it (a sweep's trials, run in Ray
    worker processes, log where their sweep does)."""

    def __init__(
        self,
        cfg: CohortcastConfig,
        nested_in: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        resume_run_id: str | None = None,
        tracking_uri: str | None = None,
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.nested_in, self.run_name, self.tags = nested_in, run_name or cfg.run_name, dict(tags or {})
        self.resume_run_id = resume_run_id
        self.enabled = cfg.mlflow.enabled
        self.uri = tracking_uri or resolve_tracking_uri(cfg)
        self.parent_id: str | None = None
        if not self.enabled:
            return
        self.mlflow = mlflow
        _set_tracking_uri_without_leaking(mlflow, self.uri)
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is None:
            local_uri, artifacts = local_store(cfg.workdir)
            artifact_location = artifacts + "/" + cfg.mlflow.experiment if self.uri == local_uri else None
            self.experiment_id = self.client.create_experiment(cfg.mlflow.experiment, artifact_location)
        else:
            self.experiment_id = experiment.experiment_id

    def __enter__(self) -> JobRuns:
        if not self.enabled:
            return self
        if self.resume_run_id:
            self.parent_id = self.mlflow.start_run(run_id=self.resume_run_id).info.run_id
            log.info("MLflow: resumed run %s at %s", self.parent_id, self.uri)
            return self
        tags = {**self.tags, **({PARENT_TAG: self.nested_in} if self.nested_in else {})}
        run = self.mlflow.start_run(experiment_id=self.experiment_id, run_name=self.run_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, flatten(self.cfg))
        with tempfile.TemporaryDirectory() as tmp:
            dump_yaml(self.cfg, Path(tmp) / "config.yaml")
            self.client.log_artifact(self.parent_id, str(Path(tmp) / "config.yaml"))
        log.info("MLflow: run %s in experiment %r at %s", self.parent_id, self.cfg.mlflow.experiment, self.uri)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:
            self.mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    # ----- helpers ---------------------------------------------------------------
    def log_params(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if not (self.enabled and run_id):
            return  # a sweep's trial logs its grid values whether MLflow is on or not
        # log_batch splits into requests of MLflow's per-batch limits itself.
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in _params(values).items()])

    def log_metrics(self, run_id: str | None, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if not (self.enabled and run_id):
            return
        now = int(time.time() * 1000)
        values = [
            Metric(k, float(v), now, 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        self.client.log_batch(run_id, metrics=values)

    def log_dict(self, run_id: str | None, data: dict, artifact_file: str) -> None:
        if self.enabled and run_id:
            self.client.log_dict(run_id, data, artifact_file)

    def start_child(self, stage: str, params: dict[str, Any]) -> str | None:
        if not self.enabled:
            return None
        run = self.client.create_run(
            self.experiment_id, run_name=stage, tags={PARENT_TAG: self.parent_id, "cohortcast.stage": stage}
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finish_child(self, run_id: str | None, status: str, summary: dict[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.log_dict(run_id, summary, "stage_summary.json")
        self.client.set_terminated(run_id, "FINISHED")

    def fail_child(self, run_id: str | None) -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, "FAILED")

    def tracking_for_workers(self, run_id: str | None) -> dict[str, str] | None:
        return {"uri": self.uri, "run_id": run_id} if (self.enabled and run_id) else None

    def loss_history(self, run_id: str | None, key: str = "loss/total") -> list[float]:
        if not (self.enabled and run_id):
            return []
        return [m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]

    def location(self) -> str:
        if not self.enabled:
            return "MLflow disabled (mlflow.enabled: false)"
        return (
            f"MLflow: {self.uri} experiment {self.cfg.mlflow.experiment!r} (id {self.experiment_id}), "
            f"run {self.parent_id}\n  browse: mlflow ui --backend-store-uri {self.uri}"
        )


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The dataset card without the driver-only bits (it is already pseudonymous)."""
    return json.loads(json.dumps({k: v for k, v in card.items() if k != "reused"}, default=str))
