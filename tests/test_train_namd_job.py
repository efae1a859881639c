"""jobs/train_namd.py end to end through a local `ray job submit`, logging to an MLflow
server on loopback: every stage trains, the MLflow run holds params, metrics,
artifacts and the registered Forecaster; a second submission skips every stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
TRAINED = ("vae", "ldm_uncond", "ldm_cond", "regressor")
OVERRIDES = (
    [f"training.{s}.max_steps={STEPS}" for s in TRAINED]
    + [f"training.{s}.checkpoint_every=2" for s in TRAINED]
    + [
        # The demo reports every 3rd step; this test checks one metric row per step.
        f"training.{s}.log_every=1"
        for s in TRAINED
    ]
    + [
        # The no-diffusion regressor stage too (the evaluation job adds it on its own).
        "training.stages=[vae,latents,ldm_uncond,ldm_cond,regressor]",
        # Validation once, at the end of each stage (what the assertions read), and small.
        "training.validation.every_epochs=100",
        "training.validation.cases=2",
        "training.validation.samples=1",
        "training.validation.inference_steps=2",
        "mlflow.registry_name=namd-e2e",
        "mlflow.experiment=namd-e2e",
        # The demo's 40 patients are for the evaluation; 12 are enough to train through.
        # (no spaces: `ray job submit` runs the entrypoint through a shell)
        "synth.patients=12",
        "ingest.split.train=0.6",
        "ingest.split.val=0.2",
        "ingest.split.test=0.2",
    ]
)


def submit(ray_session, workdir: Path, mlflow_uri: str) -> subprocess.CompletedProcess:
    address = ray_session.test_job_address
    runtime_env = {
        "working_dir": str(ROOT),
        "env_vars": {
            "PYTHONPATH": "platform",
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "COHORTCAST_PSEUDONYM_SECRET": "test-secret",
        },
        "excludes": [".venv", "runs", "mlruns", ".git"],
    }
    entry = [
        sys.executable,
        "jobs/train_namd.py",
        "--config",
        "jobs/configs/namd_debug.yaml",
        "--set",
        f"workdir={workdir}",
    ] + [a for o in OVERRIDES for a in ("--set", o)]
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.run(
        [
            str(ray_cli),
            "job",
            "submit",
            "--address",
            address,
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entry,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": address},
    )


def test_train_namd_job_end_to_end(ray_session, mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)

    first = submit(ray_session, tmp_path, mlflow_server)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    summary = first.stdout[first.stdout.index("NAMD job summary") :]
    for stage in ("vae", "latents", "ldm_uncond", "ldm_cond", "regressor"):
        assert any(line.startswith(stage) and ("trained" in line or "built" in line) for line in summary.splitlines())
    assert f"MLflow: {mlflow_server}" in summary

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("namd-e2e")
    parent = client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'namd-debug'")[0]
    assert parent.data.params["training.ldm_cond.max_steps"] == str(STEPS)
    assert parent.data.params["model.conditioner.llm_path"].endswith("runs/demo/tiny-gemma3")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "dataset")}
    assert artifacts == {"dataset/ingest_card.json"}
    children = {
        r.data.tags["mlflow.runName"]: r
        for r in client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert set(children) == {"vae", "latents", "ldm_uncond", "ldm_cond", "regressor"}
    cond = children["ldm_cond"]
    history = client.get_metric_history(cond.info.run_id, "loss/total")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # per step, once (rank 0 only)
    for key in (
        "loss/diffusion",
        "loss/task",
        "lr",
        "samples_per_s",
        "first_batch_s",
        "val/forecast_mae",
        "val/no_change_mae",
        "val/latent_error",
        "val/no_change_latent_error",
        "val/best_latent_error",
    ):
        assert key in cond.data.metrics, key
    # The exported Forecaster is the best-validation weights, with the scales computed
    # from the trained VAE and the training changes; the regressor is a Forecaster too.
    from cohortcast.models.forecaster import Forecaster

    assert list((tmp_path / "runs/demo/ray_results").glob("ldm_cond-*/best_validation.safetensors"))
    forecaster = Forecaster.load(
        tmp_path / "runs/demo/train/ldm_cond", llm_path=str(tmp_path / "runs/demo/tiny-gemma3")
    )
    assert forecaster.cfg.vae.scaling_factor > 0 and forecaster.cfg.denoiser.change_scale > 0
    regressor = Forecaster.load(
        tmp_path / "runs/demo/train/regressor", llm_path=str(tmp_path / "runs/demo/tiny-gemma3")
    )
    assert regressor.cfg.kind == "regression" and regressor.cfg.vae.scaling_factor == forecaster.cfg.vae.scaling_factor
    grids = client.list_artifacts(cond.info.run_id, "validation")
    assert grids and all(g.path.endswith(".png") for g in grids)
    assert "val/reconstruction_l1" in children["vae"].data.metrics

    # The registered Forecaster loads through MLflow and forecasts a pseudonymous case.
    model = mlflow.pyfunc.load_model("models:/namd-e2e/1")
    crop = np.zeros((32, 32), np.float32).tolist()
    ehr = json.dumps({"SCT_PRE_ATT": "Soft Tissue", "SCT_EPI_LOC": "Right Upper Lobe", "SCT_LONG_DIA": 8.0})
    out = model.predict(
        pd.DataFrame({"case_id": ["sub-x/n1"], "baseline": [crop], "horizon_days": [365.0], "ehr": [ehr]}),
        params={"num_samples": 2, "steps": 3},
    )
    assert np.asarray(out["mean"][0]).shape == (32, 32) and np.isfinite(np.asarray(out["mean"][0])).all()

    # Privacy: no manifest identifier in any param or in the logged dataset card.
    ids = pd.read_parquet(tmp_path / "runs/demo/cohort/patients.parquet")["patient_id"].astype(str)
    card = Path(client.download_artifacts(parent.info.run_id, "dataset/ingest_card.json", str(tmp_path))).read_text()
    values = " ".join(parent.data.params.values()) + card
    assert not [i for i in ids if i in values]

    again = submit(ray_session, tmp_path, mlflow_server)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    rerun = again.stdout[again.stdout.index("NAMD job summary") :]
    for stage in ("vae", "latents", "ldm_uncond", "ldm_cond", "regressor"):
        assert any(line.startswith(stage) and "up to date" in line for line in rerun.splitlines()), rerun
