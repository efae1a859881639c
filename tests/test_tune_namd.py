"""Ray Tune sweeps: the grid as validated configs, shared upstreams, concurrency from the
cluster, best-trial selection; and a 2x1 sweep (two keys, two trials) on the tiny config end to end: one MLflow
child run per trial, the upstream trained once, a best config that loads, a rerun that
resumes without training anything again."""

from pathlib import Path

import pytest

from cohortcast.config import ConfigError, load_config
from cohortcast.tuning.grid import concurrent_trials, grid_points, trial_config, trial_name, upstream_key, with_values
from cohortcast.tuning.sweep import pick_best

ROOT = Path(__file__).resolve().parents[1]


def test_grid_points_cover_every_combination_once():
    points = grid_points({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(points) == 6 and len({tuple(p.items()) for p in points}) == 6
    assert {p["b"] for p in points} == {"x", "y", "z"}


def test_trial_names_are_short_and_unambiguous():
    assert trial_name({"training.task_weight": 0.5, "model.vae.loss.tau_f": 1.0}) == "task_weight=0.5,tau_f=1.0"
    assert trial_name({"training.vae.lr": 1, "training.ldm_cond.lr": 2}) == "vae.lr=1,ldm_cond.lr=2"


def test_grid_values_are_validated_and_name_the_key():
    base = load_config(ROOT / "jobs/configs/namd_debug.yaml")
    assert with_values(base, {"training.task_weight": 0.5}).training.task_weight == 0.5
    with pytest.raises(ConfigError, match="tune.grid.training.task_wieght"):
        with_values(base, {"training.task_wieght": 0.5})
    with pytest.raises(ConfigError, match="task_weight"):
        with_values(base, {"training.task_weight": -1.0})


def test_lambda_trials_share_the_upstream_temperature_trials_do_not():
    base = load_config(ROOT / "jobs/configs/namd_debug.yaml")
    a, b = (trial_config(base, {"training.task_weight": w}) for w in (0.1, 2.0))
    c = trial_config(base, {"training.task_weight": 0.1, "model.vae.loss.tau_f": 0.5})
    assert upstream_key(a) == upstream_key(b) != upstream_key(c)
    assert a.training.output != b.training.output  # each trial its own conditional stage


def test_concurrency_follows_the_cluster_and_the_workers_per_trial():
    cfg = load_config(None, ["training.scaling.num_workers=2", "training.scaling.cpus_per_worker=1"])
    assert concurrent_trials(cfg, {"CPU": 8.0}) == 4
    assert concurrent_trials(cfg, {"CPU": 1.0}) == 1  # never zero
    gpu = load_config(None, ["training.scaling.num_workers=4", "training.scaling.use_gpu=true"])
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 2
    assert concurrent_trials(load_config(None, ["tune.max_concurrent_trials=3"]), {"CPU": 64.0}) == 3


def test_best_trial_ignores_unfinished_ones():
    rows = [
        {"trial": "a", "status": "finished", "m": 0.5},
        {"trial": "b", "status": "stopped early", "m": None},
        {"trial": "c", "status": "finished", "m": 0.2},
        {"trial": "d", "status": "error", "m": None},
    ]
    assert pick_best(rows, "m", "min")["trial"] == "c" and pick_best(rows, "m", "max")["trial"] == "a"
    assert pick_best(rows[1:2], "m", "min") is None


def test_asha_is_built_from_the_config_only_when_enabled():
    from ray.tune.schedulers import ASHAScheduler

    from cohortcast.tuning.sweep import asha_scheduler

    assert asha_scheduler(load_config(None)) is None
    cfg = load_config(None, ["tune.asha.enabled=true", "tune.asha.grace_period=3", "training.ldm_cond.max_steps=40"])
    scheduler = asha_scheduler(cfg)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler.metric, scheduler._mode, scheduler._max_t, scheduler._time_attr) == (
        "loss/diffusion",
        "min",
        40,
        "training_iteration",
    )
    assert scheduler._brackets[0]._rungs[-1][0] == 3  # the first rung (milestone): grace_period reports


STEPS = 2
SWEEP = (
    [f"training.{s}.max_steps={STEPS}" for s in ("vae", "ldm_uncond", "ldm_cond")]
    + [
        f"training.{s}.{k}={v}"
        for s in ("vae", "ldm_uncond", "ldm_cond")
        for k, v in (("checkpoint_every", STEPS), ("log_every", 1), ("warmup_steps", 1))
    ]
    + [
        "synth.patients=12",
        "ingest.split.train=0.6",
        "ingest.split.val=0.2",
        "ingest.split.test=0.2",
        "training.scaling.num_workers=1",
        "training.validation.every_epochs=1",
        "training.validation.cases=2",
        "training.validation.samples=1",
        "training.validation.inference_steps=2",
        "mlflow.experiment=sweep-test",
        # two keys (a product grid), two trials: one wave at 2 concurrent trials (CI time; the
        # product itself is tested above)
        "tune.grid={training.task_weight: [0.1, 1.0], training.ldm_cond.lr: [0.0005]}",
    ]
)


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_2x1_sweep_end_to_end_and_resumed(ray_session, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cohortcast.tracking.job_runs import local_store
    from cohortcast.tuning.sweep import format_sweep, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(ROOT / "jobs/configs/namd_debug.yaml", [f"workdir={tmp_path}", *SWEEP])
    report = run_sweep(cfg)
    print(format_sweep(report))
    assert [r["status"] for r in report.rows] == ["finished"] * 2 and report.upstreams == 1
    assert report.max_concurrent_trials == 2  # 2 CPUs, 1 worker x 1 CPU per trial
    metric = cfg.tune.metric
    assert report.best[metric] == min(r[metric] for r in report.rows)

    best = load_config(report.best_config)  # ready to run: loads as a train_namd config
    assert best.training.task_weight == report.best["training.task_weight"]
    assert best.training.ldm_cond.lr == report.best["training.ldm_cond.lr"]

    client = MlflowClient(local_store(tmp_path)[0])
    experiment = client.get_experiment_by_name("sweep-test")
    sweep = client.search_runs([experiment.experiment_id], "tags.`cohortcast.sweep` = 'namd-sweep'")
    assert len(sweep) == 1
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep[0].info.run_id}'")
    trials = [r for r in children if "cohortcast.trial" in r.data.tags]
    assert sorted(r.data.tags["cohortcast.trial"] for r in trials) == sorted(r["trial"] for r in report.rows)
    assert all(metric in r.data.metrics and "trial.training.task_weight" in r.data.params for r in trials)
    assert [r.data.tags["mlflow.runName"] for r in children].count("vae") == 1  # one upstream for both trials
    artifacts = {a.path for a in client.list_artifacts(sweep[0].info.run_id, "sweep")}
    assert {"sweep/summary.csv", "sweep/summary.md", "sweep/best_config.yaml", "sweep/best.json"} <= artifacts

    markers = {r["trial"]: (Path(r["forecaster"]) / "stage.json").stat().st_mtime for r in report.rows}
    again = run_sweep(cfg)  # resumes: the same parent run, finished trials kept, nothing retrained
    assert [r["status"] for r in again.rows] == ["finished"] * 2
    assert {r["trial"]: (Path(r["forecaster"]) / "stage.json").stat().st_mtime for r in again.rows} == markers
    assert len(client.search_runs([experiment.experiment_id], "tags.`cohortcast.sweep` = 'namd-sweep'")) == 1
