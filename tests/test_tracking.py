"""MLflow: the embedded local store by default, a remote server through
MLFLOW_TRACKING_URI; parent/child runs; rank-0-only logging from workers."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cohortcast.config import CohortcastConfig, flatten
from cohortcast.config.paths import resolve_paths
from cohortcast.tracking.job_runs import PARENT_TAG, STATUS_TAG, JobRuns, local_store
from cohortcast.training.stage_tracker import StageTracker

MANY_METRICS = 1205  # over MLflow's 1000 metrics per request


def _exercise(cfg):
    with JobRuns(cfg) as runs:
        child = runs.start_child("vae", {"training.vae.lr": 0.001})
        tracking = runs.tracking_for_workers(child)
        assert StageTracker.for_rank(tracking, 1) is None  # only world rank 0 logs
        tracker = StageTracker.for_rank(tracking, 0)
        for step, loss in enumerate([1.0, 0.7, 0.5], start=1):
            tracker.log_metrics({"loss/total": loss, "lr": 1e-3, "note": "not a number"}, step)
        tracker.log_png(np.arange(64, dtype=np.uint8).reshape(8, 8), "validation/grid.png")
        runs.finish_child(child, "trained", {"first_loss": 1.0})
        assert runs.loss_history(child) == [1.0, 0.7, 0.5]
        runs.log_metrics(runs.parent_id, {f"table/{i}": float(i) for i in range(MANY_METRICS)})
        return runs.uri, runs.parent_id, child


def _check(uri, parent_id, child_id):
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["training.task_weight"] == "1.0" and "model.vae.latent_channels" in parent.data.params
    # More than one MLflow request holds (100 params, 1000 metrics): every one arrives.
    assert len(parent.data.params) == len(flatten(CohortcastConfig())) > 100
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("table/")} == {
        f"table/{i}": float(i) for i in range(MANY_METRICS)
    }
    assert [a.path for a in client.list_artifacts(parent_id)] == ["config.yaml"]
    child = client.get_run(child_id)
    assert child.data.tags[PARENT_TAG] == parent_id and child.data.tags[STATUS_TAG] == "trained"
    assert child.data.params["training.vae.lr"] == "0.001" and "note" not in child.data.metrics
    assert [a.path for a in client.list_artifacts(child_id, "validation")] == ["validation/grid.png"]


def test_default_is_a_local_store_under_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = resolve_paths(CohortcastConfig(workdir=str(tmp_path)))
    uri, parent, child = _exercise(cfg)
    assert uri == local_store(tmp_path)[0] and (tmp_path / "mlruns" / "mlflow.db").is_file()
    _check(uri, parent, child)
    assert list((tmp_path / "mlruns" / "artifacts").rglob("grid.png"))  # artifacts under the workdir too


def test_a_job_leaves_no_tracking_uri_behind_for_the_next_job_in_its_process(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; in a reused Ray worker the
    next job (a sweep's next trial) then logged to the previous job's store (CI saw a
    sweep whose trials were missing from its own store)."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = resolve_paths(CohortcastConfig(workdir=str(tmp_path / "first")))
    with JobRuns(first) as runs:
        assert runs.uri == local_store(tmp_path / "first")[0]
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = resolve_paths(CohortcastConfig(workdir=str(tmp_path / "second")))
    with JobRuns(second) as runs:
        assert runs.uri == local_store(tmp_path / "second")[0]
    explicit = local_store(tmp_path / "sweep")[0]
    with JobRuns(second, tracking_uri=explicit) as runs:  # a trial logs where its sweep does
        assert MlflowClient(explicit).get_run(runs.parent_id).info.run_id == runs.parent_id


@pytest.mark.timeout(300)
def test_remote_server_through_the_environment(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = resolve_paths(CohortcastConfig(workdir=str(tmp_path)))
    uri, parent, child = _exercise(cfg)
    assert uri == mlflow_server and not (tmp_path / "mlruns").exists()
    _check(mlflow_server, parent, child)
