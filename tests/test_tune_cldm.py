"""The CLDM lambda sweep (jobs/tune_cldm.py, `cohortcast tune --job cldm`) through the
shared Tune machinery: the job's defaults and checks without Ray, then one sweep over
two lambdas on a tiny CLDM cohort end to end: each trial trains its own diffusion stage
with its own lambda, the upstream (encoder, study latent cache, segmentation decoder)
trains once, the summary has a row per lambda, the best config loads and carries the
best lambda, and a rerun trains nothing."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from cohortcast.config import ConfigError, load_config
from cohortcast.tuning.grid import trial_config, upstream_config, upstream_key
from cohortcast.tuning.jobs import sweep_job

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_cldm_job import COHORT, TINY  # noqa: E402  (the tiny CLDM cohort and encoder)

LAMBDA = "cldm.training.diffusion.task_weight"


def test_cldm_sweep_defaults_come_from_the_job():
    cfg = load_config(ROOT / "jobs/configs/cldm_debug.yaml")
    assert cfg.tune.job == "cldm" and cfg.tune.grid == {LAMBDA: [0.0, 0.1, 0.5, 1.0, 2.0]}
    assert (cfg.tune.metric, cfg.tune.mode, cfg.tune.asha.metric) == ("val/best_avd", "min", "loss/diffusion_3d")
    # `--job cldm` on a config without a tune section: CLDM's grid, metric and name, not NAMD's
    other = load_config(ROOT / "jobs/configs/cldm_synthetic_eval.yaml", ["tune.job=cldm"])
    assert (other.tune.grid, other.tune.metric, other.tune.name) == (cfg.tune.grid, "val/best_avd", "cldm-sweep")
    namd = load_config(ROOT / "jobs/configs/namd_debug.yaml")
    assert (namd.tune.job, namd.tune.metric, namd.tune.asha.metric) == ("namd", "val/forecast_mae", "loss/diffusion")


def test_lambda_trials_share_one_upstream_and_write_their_own_diffusion_stage():
    base = load_config(ROOT / "jobs/configs/cldm_debug.yaml")
    a, b = (trial_config(base, {LAMBDA: w}) for w in (0.0, 2.0))
    assert a.cldm.training.diffusion.task_weight == 0.0 and b.cldm.training.diffusion.task_weight == 2.0
    assert upstream_key(a) == upstream_key(b)
    assert a.cldm.training.output != b.cldm.training.output
    assert a.cldm.training.output.endswith("trials/task_weight=0.0")
    c = trial_config(base, {LAMBDA: 0.0, "cldm.training.segmentation.lr": 1e-4})
    assert upstream_key(c) != upstream_key(a)  # a decoder setting is an upstream of its own
    up = upstream_config(a)
    assert up.cldm.training.output == str(Path(base.tune.output) / "shared" / upstream_key(a))
    assert up.cldm.training.stages == ("encoder", "study_latents", "segmentation", "report")


def test_cldm_sweep_checks_refuse_before_any_work():
    base = load_config(ROOT / "jobs/configs/cldm_debug.yaml")
    job = sweep_job(base)
    with pytest.raises(ConfigError, match="tune.grid.training.task_weight: not a CLDM setting"):
        job.check(load_config(ROOT / "jobs/configs/cldm_debug.yaml", ["tune.grid={training.task_weight: [1.0]}"]))
    with pytest.raises(ConfigError, match="add \\['diffusion'\\]"):
        job.check(load_config(ROOT / "jobs/configs/cldm_debug.yaml", ["cldm.training.stages=[encoder,study_latents]"]))
    no_seg = ["cldm.training.stages=[encoder,study_latents,diffusion]"]
    with pytest.raises(ConfigError, match="tune.metric: val/best_avd needs the segmentation decoder"):
        job.check(load_config(ROOT / "jobs/configs/cldm_debug.yaml", no_seg))
    job.check(load_config(ROOT / "jobs/configs/cldm_debug.yaml", [*no_seg, "tune.metric=val/latent_error_3d"]))


STEPS = 3
SWEEP = [
    *(f"cldm.encoder.{kv}" for kv in TINY),
    "cldm.encoder.volume_3d=[8,16,16]",  # what the cohort ingests (the token grids follow)
    "cldm.encoder.image_2d=[16,16]",
    *COHORT,
    "cldm.training.stages=[encoder,study_latents,segmentation,diffusion]",
    "cldm.models.latent.dims=[3]",  # CT only: no report decoder to train
    "cldm.models.prior_summary=pooled",
    *(
        f"cldm.training.encoder.{kv}"
        for kv in ("max_steps=2", "micro_batch_3d=1", "micro_batch_2d=2", "warmup_steps=1", "checkpoint_every=2")
    ),
    "cldm.training.encoder.log_every=2",
    "cldm.training.validation.every_epochs=100",
    "cldm.training.validation.cases=1",
    "cldm.training.validation.max_rows=2",
    "cldm.training.latent_cache.actors=1",
    "cldm.training.latent_cache.batch_size=4",
    *(
        f"cldm.training.segmentation.{kv}"
        for kv in ("max_steps=2", "micro_batch_size=2", "checkpoint_every=2", "log_every=2", "warmup_steps=1")
    ),
    *(
        f"cldm.training.diffusion.{kv}"
        for kv in (
            f"max_steps={STEPS}",
            "micro_batch_3d=1",
            "micro_batch_2d=0",
            f"checkpoint_every={STEPS}",
            f"log_every={STEPS}",
            "warmup_steps=1",
        )
    ),
    "cldm.training.forecast_validation.every_epochs=100",  # at the start and at the end
    "cldm.training.forecast_validation.samples=1",
    "cldm.training.forecast_validation.inference_steps=2",
    "training.scaling.num_workers=1",
    "mlflow.experiment=cldm-sweep-test",
    "tune.job=cldm",
    f"tune.grid={{{LAMBDA}: [0.0, 1.0]}}",
]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_lambda_sweep_end_to_end_and_resumed(ray_session, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cohortcast.tuning.sweep import format_sweep, run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [*SWEEP, f"workdir={tmp_path}", f"mlflow.tracking_uri={uri}"])
    report = run_sweep(cfg)
    print(format_sweep(report))
    metric = cfg.tune.metric
    assert metric == "val/best_avd" and report.job == "cldm"
    assert [r["status"] for r in report.rows] == ["finished"] * 2 and report.upstreams == 1
    assert sorted(r[LAMBDA] for r in report.rows) == [0.0, 1.0]
    assert all(isinstance(r[metric], float) for r in report.rows)
    assert report.best[metric] == min(r[metric] for r in report.rows)

    # Each trial its own diffusion stage, in its own folder, trained with its own lambda.
    tune_out = Path(tmp_path) / "runs/demo/tune"
    for row in report.rows:
        folder = Path(row["forecaster"])
        assert folder == tune_out / "trials" / row["trial"] / "diffusion"
        assert json.loads((folder / "stage.json").read_text())["key"]

    # The upstream trained once, into one shared folder.
    shared = list((tune_out / "shared").iterdir())
    assert len(shared) == 1 and {p.name for p in shared[0].iterdir()} >= {"encoder", "segmentation"}

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cldm-sweep-test").experiment_id
    sweep = client.search_runs([experiment], "tags.`cohortcast.sweep` = 'cldm-sweep'")
    assert len(sweep) == 1
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep[0].info.run_id}'")
    names = [r.data.tags["mlflow.runName"] for r in children]
    assert (names.count("encoder"), names.count("study_latents"), names.count("segmentation")) == (1, 1, 1)
    trials = {r.data.tags["cohortcast.trial"]: r for r in children if "cohortcast.trial" in r.data.tags}
    assert set(trials) == {r["trial"] for r in report.rows}
    for row in report.rows:
        run = trials[row["trial"]]
        assert float(run.data.params[f"trial.{LAMBDA}"]) == row[LAMBDA] and metric in run.data.metrics
        # the diffusion stage's own run, nested in the trial's, trained with the trial's lambda
        (stage,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert stage.data.tags["mlflow.runName"] == "diffusion"
        assert float(stage.data.params[LAMBDA]) == row[LAMBDA]

    with open(tune_out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert sorted(float(r[LAMBDA]) for r in summary) == [0.0, 1.0] and all(r[metric] for r in summary)
    best = load_config(report.best_config)  # ready to run: a train_cldm config
    assert best.cldm.training.diffusion.task_weight == report.best[LAMBDA]
    assert "jobs/train_cldm.py" in Path(report.best_config).read_text().splitlines()[1]

    # A rerun: the same parent run, nothing trained again (upstream and trials up to date).
    markers = sorted(tune_out.glob("**/stage.json"))
    stamps = {p: p.stat().st_mtime for p in markers}
    again = run_sweep(cfg)
    assert [r["status"] for r in again.rows] == ["finished"] * 2
    assert {r["trial"]: r[metric] for r in again.rows} == {r["trial"]: r[metric] for r in report.rows}
    assert {p: p.stat().st_mtime for p in sorted(tune_out.glob("**/stage.json"))} == stamps
    assert len(client.search_runs([experiment], "tags.`cohortcast.sweep` = 'cldm-sweep'")) == 1
