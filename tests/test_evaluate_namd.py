"""The evaluation job on Ray: evaluator trained with Ray Train, cohort forecasts, Table 1,
figures, report and MLflow run; a rerun reuses the evaluator and the forecasts. A random
Forecaster stands in for a trained one: the job's plumbing is under test here, the
numbers are measured by `make demo` (README)."""

import copy
import json

import pytest
import torch

from conftest import forecaster_config

from cohortcast.config import IngestConfig, SplitConfig, load_config
from cohortcast.config.models import ConditionerConfig, SchedulerConfig
from cohortcast.config.training import ScalingSettings, StageConfig
from cohortcast.evaluation.namd_evaluation import (
    COPY,
    NAMD,
    REAL_BASELINE,
    REAL_FOLLOW_UP,
    VAE_FLOOR,
    ablation_config,
    run_evaluation,
)
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.tiny_llm import write_tiny_gemma3

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_ablation_config_drops_alignment_probe_and_task_loss():
    cfg = load_config("jobs/configs/namd_debug.yaml")
    a = ablation_config(cfg)
    assert (a.model.vae.loss.alignment, a.model.vae.loss.probe, a.training.task_weight) == (0, 0, 0)
    assert a.training.output == cfg.evaluation.ablation.training_output != cfg.training.output
    assert a.model.vae.loss.reconstruction == cfg.model.vae.loss.reconstruction and a.ingest == cfg.ingest
    assert cfg.model.vae.loss.alignment > 0  # the original is untouched
    cfg.training.task_loss, cfg.training.task_weight = "decoded_l1", 0.5  # kept: only probe_bce needs the probe
    assert (ablation_config(cfg).training.task_loss, ablation_config(cfg).training.task_weight) == ("decoded_l1", 0.5)


def evaluation_config(tmp_path, tiny_cohort, tiny_ingested):
    llm = write_tiny_gemma3(tmp_path / "llm", ["solid nodule right upper lobe long axis mm"])
    torch.manual_seed(0)
    model = forecaster_config(
        conditioner=ConditionerConfig(llm_path=str(llm), num_soft_prompts=2, max_length=64),
        scheduler=SchedulerConfig(micro_batch=4),
    )
    Forecaster(model).save(tmp_path / "forecaster")
    # No ablation and no regressor (both would train the NAMD stages): the plumbing is under test.
    cfg = load_config(
        None,
        [
            "evaluation.ablation.enabled=false",
            "evaluation.regressor.enabled=false",
            "evaluation.evaluator.validate_every_epochs=1",
        ],
    )
    cfg.workdir, cfg.run_name = str(tmp_path), "eval-test"
    cfg.model = model
    # The tiny_ingested fixture's own settings: prepare_cohort finds it up to date.
    cfg.ingest = IngestConfig(
        manifest=str(tiny_cohort),
        output=str(tiny_ingested),
        crop_size=32,
        crop_spacing_mm=1.5,
        patch_size=8,
        volume_shape=(8, 16, 16),
        split=SplitConfig(1.0, 0.0, 0.0),
    )
    cfg.synthesize_if_missing = False
    cfg.training.scaling = ScalingSettings(num_workers=1, storage_path=str(tmp_path / "ray"))
    cfg.evaluation.evaluator.train = StageConfig(
        max_steps=4, micro_batch_size=2, warmup_steps=1, checkpoint_every=2, lr=1e-3
    )
    cfg.evaluation.evaluator_output = str(tmp_path / "evaluator")
    cfg.evaluation.report = str(tmp_path / "report")
    f = cfg.forecast
    f.forecaster, f.ingested, f.output, f.split = (
        str(tmp_path / "forecaster"),
        str(tiny_ingested),
        str(tmp_path / "forecasts"),
        "train",
    )
    f.num_samples, f.inference_steps, f.write_dicom, f.cases_per_batch = 3, 2, False, 4
    return cfg


def test_evaluation_job_end_to_end(ray_session, tiny_cohort, tiny_ingested, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg = evaluation_config(tmp_path, tiny_cohort, tiny_ingested)
    result = run_evaluation(copy.deepcopy(cfg))
    table = result.table
    assert [r.method for r in table.rows] == [REAL_BASELINE, REAL_FOLLOW_UP, NAMD, COPY, VAE_FLOOR]
    assert table.row(NAMD).auroc.n == 3 and table.row(REAL_BASELINE).auroc.n == 1
    assert table.row(COPY).auroc.mean == table.row(REAL_BASELINE).auroc.mean
    assert table.frechet_space.startswith("evaluator ViT") and table.lpips.startswith("n/a")
    texts = {c.text for c in result.claims}
    assert {f"{REAL_BASELINE} < {NAMD}", f"{NAMD} <= {REAL_FOLLOW_UP}"} <= texts
    assert {f"{NAMD} mean-forecast MAE < {COPY}", f"{NAMD} latent error < {COPY}"} <= texts  # the error columns

    report = tmp_path / "report"
    text = (report / "report.md").read_text()
    assert table.markdown() in text and f"{table.n_cases} cases" in text
    for figure in ("error_vs_variance", "running_variance", "variance_maps"):
        assert (report / "figures" / f"{figure}.png").stat().st_size > 2000
    saved = json.loads((report / "table.json").read_text())
    assert saved["table"]["rows"][2]["auroc"]["mean"] == pytest.approx(table.row(NAMD).auroc.mean)
    assert (report / "cases.csv").read_text().count("\n") == table.n_cases + 1
    assert "sub-" in (report / "cases.csv").read_text()  # pseudonymous case ids only

    client = MlflowClient(result.mlflow.split()[1])
    run_id = result.mlflow.split("run ")[1].split()[0]
    run = client.get_run(run_id)
    assert run.data.metrics["namd_forecast/auroc_mean"] == pytest.approx(table.row(NAMD).auroc.mean)
    assert {a.path for a in client.list_artifacts(run_id, "report")} >= {"report/report.md", "report/figures"}
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert {c.info.run_name for c in children} == {"evaluator", "forecast_namd"}
    mlflow.set_tracking_uri(None)

    again = run_evaluation(copy.deepcopy(cfg))  # everything reused: same evaluator, same forecasts, same table
    assert again.table.markdown() == table.markdown()
    summary = json.loads((tmp_path / "forecasts" / "summary.json").read_text())
    assert summary["forecast_this_run"] == 0
