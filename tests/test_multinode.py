"""Multi-node: the stages, cohort forecasting and sweeps on a local 3-to-5-node Ray
cluster (tests/multinode_scenarios.py, in a subprocess: this session holds its own
Ray instance), with nodes lost mid-job; and the settings a real cluster needs
(placement strategy, storage URIs), without Ray."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.train
import ray.train.torch

from conftest import forecaster_config

from cohortcast.config import ConfigError, load_config
from cohortcast.config.training import ScalingSettings
from cohortcast.training import runner

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- settings


@pytest.fixture
def captured_trainer(monkeypatch):
    """run_stage with a stand-in TorchTrainer: what it would hand Ray Train."""
    seen = {}

    class FakeTrainer:
        def __init__(self, loop, **kwargs):
            seen.update(kwargs)

        def fit(self):
            return seen

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    return lambda scaling: runner.run_stage("s", lambda c: None, {}, {"train": None}, scaling)


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
def test_placement_strategy_reaches_ray_train(captured_trainer, strategy):
    seen = captured_trainer(ScalingSettings(num_workers=2, placement_strategy=strategy))
    assert seen["scaling_config"].placement_strategy == strategy
    assert seen["scaling_config"].num_workers == 2


def test_placement_strategy_defaults_to_pack_and_is_validated():
    assert load_config(None).training.scaling.placement_strategy == "PACK"  # today's behaviour
    assert load_config(None, ["training.scaling.placement_strategy=SPREAD"]).training.scaling.placement_strategy == (
        "SPREAD"
    )
    with pytest.raises(ConfigError, match="training.scaling.placement_strategy"):
        load_config(None, ["training.scaling.placement_strategy=spread"])
    with pytest.raises(ConfigError, match="placement_strategy"):  # built in code, not loaded
        runner.run_stage("s", lambda c: None, {}, {}, ScalingSettings(placement_strategy="ANYWHERE"))


@pytest.mark.parametrize("uri", ["s3://bucket/cohortcast/ray_results", "gs://b/r", "file:///mnt/shared/ray"])
def test_a_storage_uri_passes_through_unchanged(captured_trainer, uri):
    seen = captured_trainer(ScalingSettings(storage_path=uri))
    assert seen["run_config"].storage_path == uri
    assert runner.storage_location(uri) == uri


def test_a_local_storage_path_is_made_absolute(captured_trainer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = captured_trainer(ScalingSettings(storage_path="runs/ray"))
    assert seen["run_config"].storage_path == str(tmp_path / "runs/ray")


def test_best_weights_stay_a_file_path_when_storage_is_a_uri(tmp_path):
    from cohortcast.pipeline.namd import best_weights_path

    assert (
        best_weights_path("s3://b/ray", tmp_path, "ldm_cond-k") == tmp_path / "ldm_cond-k.best_validation.safetensors"
    )
    assert best_weights_path(str(tmp_path / "ray"), tmp_path, "ldm_cond-k") == (
        tmp_path / "ray" / "ldm_cond-k" / "best_validation.safetensors"
    )


def test_a_sweep_trial_logs_nothing_when_mlflow_is_off():
    """trial_stage logs its grid values through JobRuns: with mlflow.enabled false that
    was an AttributeError in every trial."""
    from cohortcast.tracking.job_runs import JobRuns

    with JobRuns(load_config(None, ["mlflow.enabled=false"])) as runs:
        runs.log_params(runs.parent_id, {"trial.training.task_weight": 0.1})


@pytest.fixture(scope="module")
def structured_forecaster(tmp_path_factory):
    """An untrained Forecaster with the structured EHR token (no LLM to load per actor)."""
    import torch

    from cohortcast.config.models import ConditionerConfig
    from cohortcast.models.forecaster import Forecaster

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("multinode-forecaster") / "model"
    Forecaster(forecaster_config(conditioner=ConditionerConfig(kind="structured"))).save(folder)
    return folder


@pytest.mark.ray
def test_a_retried_forecast_batch_keeps_the_cases_its_lost_attempt_wrote(
    ray_session, tiny_ingested, structured_forecaster, tmp_path
):
    """Ray Data retries a batch whose actor died with its node: cases that attempt
    already wrote are not forecast (or written) again, the rest are."""
    from cohortcast.config.training import ForecastJobConfig
    from cohortcast.inference.cohort_forecast import CASE_FILE, CaseForecaster, case_key, read_cases

    job = ForecastJobConfig(
        forecaster=str(structured_forecaster),
        ingested=str(tiny_ingested),
        split="train",
        output=str(tmp_path),
        num_samples=1,
        inference_steps=2,
        write_dicom=False,
    )
    card = json.loads((tiny_ingested / "card.json").read_text())
    actor = CaseForecaster(job.forecaster, job, card, None)
    batch = {k: v[:2] for k, v in read_cases(tiny_ingested, "train").items()}
    lost_attempt = actor({k: v[:1] for k, v in batch.items()})  # wrote the first case, then its node went
    first = tmp_path / "cases" / case_key(str(batch["case_id"][0])) / CASE_FILE
    written = first.stat().st_mtime_ns
    retry = actor(batch)
    assert np.isfinite(lost_attempt["seconds"]).all() and lost_attempt["node_id"][0]
    assert np.isnan(retry["seconds"][0]) and retry["node_id"][0] == ""  # found, not redone
    assert np.isfinite(retry["seconds"][1]) and retry["node_id"][1]
    assert first.stat().st_mtime_ns == written
    assert (tmp_path / "cases" / case_key(str(batch["case_id"][1])) / CASE_FILE).is_file()
    assert list(retry["case_id"]) == [str(c) for c in batch["case_id"]]


# --------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def observations(tiny_ingested, structured_forecaster, tmp_path_factory):
    """Run every scenario on one local cluster in a subprocess; its observations."""
    workdir = tmp_path_factory.mktemp("multinode")
    out = workdir / "observations.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT / "tests")])}
    env.pop("RAY_ADDRESS", None)  # the cluster is its own, not this session's instance
    log = workdir / "scenarios.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "multinode_scenarios.py"), str(out), str(workdir)]
            + [str(tiny_ingested), str(structured_forecaster)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: the cluster's processes go with it
        )
        try:
            code = proc.wait(timeout=540)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "killed after 540 s"
    tail = log.read_text()[-4000:]
    assert code == 0, f"scenarios exited {code}:\n{tail}"
    data = json.loads(out.read_text())
    print(json.dumps(data["timings"]))
    data["log_tail"] = tail
    return data


def scenario(observations, name):
    got = observations.get(name)
    assert got is not None, f"scenario {name} did not run:\n{observations['log_tail']}"
    assert "failed" not in got, f"scenario {name} failed: {got['failed']}\n{got['traceback']}"
    return got


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_stage_spreads_its_workers_and_resumes_after_losing_a_node(observations):
    train = scenario(observations, "train")
    names = train["node_names"]
    first = [w for w in train["workers"] if w["attempt"] == "first"]
    resumed = [w for w in train["workers"] if w["attempt"] == "resumed"]
    # SPREAD: two workers on two nodes, though one node holds both (PACK would)
    assert len(first) == 2 and len({w["node"] for w in first}) == 2
    assert train["victim"] in {names[w["node"]] for w in first}  # the lost node held a worker
    # restarted once (FailureConfig.max_failures), on the nodes left, spread again
    assert len(resumed) == 2 and len({w["node"] for w in resumed}) == 2
    assert train["victim"] not in {names[w["node"]] for w in resumed}
    # no step lost or repeated: the first attempt trained up to the gate step and
    # checkpointed it, the second resumed from that checkpoint (the last one) and finished
    assert train["error"] is None
    gate, last = train["gate_step"], train["max_steps"]
    assert train["final_step"] == last and train["final_resumed_from"] == gate
    trained = {a: [s["step"] for s in train["steps"] if s["attempt"] == a] for a in ("first", "resumed")}
    assert trained == {"first": list(range(1, gate + 1)), "resumed": list(range(gate + 1, last + 1))}
    checkpoints = [r for r in train["reports"] if r["checkpoint"]]
    assert max(r["step"] for r in checkpoints if r["attempt"] == "first") == gate
    assert {r["resumed_from"] for r in train["reports"] if r["attempt"] == "resumed"} == {gate}
    # the checkpoint history, as Ray Train kept it on the shared storage: monotone,
    # every checkpoint_every steps, ending at max_steps
    steps = train["checkpoint_steps"]
    assert steps == sorted(set(steps)) == list(range(train["checkpoint_every"], last + 1, train["checkpoint_every"]))
    assert train["final_checkpoint_dir"].startswith(train["storage"])
    ds = Path(train["final_checkpoint_dir"]) / "ds"
    assert len(list(ds.glob("*optim_states.pt"))) == 2  # ZeRO-2: both ranks' optimizer shards


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_cohort_forecasting_spreads_and_redoes_a_lost_nodes_cases_once(observations, tiny_ingested):
    forecast = scenario(observations, "forecast")
    summary = forecast["summary"]
    # the actors ran on several nodes (the GCS's actor table), one of them the node
    # removed mid-job; summary.json counts the nodes whose actors finished cases, which
    # after the loss may be the survivor alone
    assert len(set(forecast["actor_nodes_at_kill"])) >= 2 and forecast["victim"] in forecast["actor_nodes_at_kill"]
    assert 1 <= summary["actor_nodes"] <= len(set(forecast["actor_nodes_at_kill"]))
    assert 0 < forecast["finished_at_kill"] < summary["cases"]  # really mid-job
    # in-job fault tolerance: the same run finished every case, each exactly once
    assert summary["finished"] == summary["cases"] == summary["forecast_this_run"]
    ids = forecast["case_ids"]
    assert len(ids) == len(set(ids)) == summary["cases"]
    assert not [f for f in forecast["case_folders"] if f.startswith(".")]  # no temp leftovers
    assert len(forecast["case_folders"]) == summary["cases"]
    # the cases written before the loss stand: a retried batch keeps them
    assert forecast["finished_before_kill_untouched"]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_sweep_trials_run_on_different_nodes(observations):
    tune = scenario(observations, "tune")
    trials = tune["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials), trials
    assert all(t["stage_status"] == "trained" and t["step"] == 2 for t in trials)
    # the experiment and each trial's output on the shared storage
    assert all(t["path"].startswith(tune["tune_storage"]) and Path(t["forecaster"]).is_dir() for t in trials)
    workers = tune["workers"]
    assert sorted(w["trial"] for w in workers) == ["task_weight=0.1", "task_weight=1.0"]
    assert len({w["node"] for w in workers}) == 2  # each trial's Train worker on its own node
    assert all(tune["node_names"][w["node"]] != "head" for w in workers)
