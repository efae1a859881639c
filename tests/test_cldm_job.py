"""The CLDM job end to end on a tiny CLDM cohort (`run_cldm`, what jobs/train_cldm.py
runs): synthesised (CT + lung mask + radiograph per exam) and ingested for real, then
the encoder pre-trains on Ray Train + DeepSpeed (ZeRO-2, 2 CPU workers) with separate
volume and radiograph micro-batches, logs both losses, validation before the first step
and at the end, and reconstruction grids (CT slices, radiographs) to its MLflow child
run, and exports a loadable encoder with new weights; the study latent cache is built
on a Ray Data actor pool with one table per dimensionality; then part 2 (issue 16): the
segmentation and report decoders, the diffusion forecaster and the regressor train a few
steps each, the output loads as one CLDMBundle and forecasts, and the evaluation job
scores it (Tables 1-2) without retraining; a rerun skips everything."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cohortcast.config import load_config
from cohortcast.evaluation.cldm_evaluation import run_cldm_evaluation
from cohortcast.inference.cldm_cohort_forecast import read_cldm_forecasts, run_cldm_cohort_forecast
from cohortcast.models.cldm_bundle import CLDMBundle
from cohortcast.models.universal_encoder import UniversalEncoder
from cohortcast.pipeline.cldm import run_cldm
from cohortcast.training.deepspeed_setup import seed_everything

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

STEPS = 6
TINY = ["dim=32", "depth=1", "heads=2", "decoder_dim=16", "decoder_heads=2", "patch_2d=[4,4]", "patch_3d=[4,8,8]"]
TINY += ["volume_3d=[8,16,16]", "image_2d=[16,16]"]  # what the cohort below ingests
# 5 patients x 2 exams (a CT and a radiograph each) on a 32 x 32 x 8 grid: 4 patients
# train, 1 val (the split's seed); volumes 8 x 16 x 16, radiographs 16 x 16.
COHORT = [
    "synth.patients=5",
    "synth.seed=3",
    "synth.min_exams=2",
    "synth.max_exams=2",
    "synth.image_size=32",
    "synth.num_slices=8",
    "synth.pixel_spacing_mm=6.0",
    "synth.slice_thickness_mm=8.0",
    "synth.fibrosis_model=trend",
    "synth.fibrosis_fraction=1.0",  # every patient has a mask: part 2 validates on the val patient
    "synth.lung_masks=true",
    "synth.radiographs=true",
    "synth.radiograph_pixel_mm=4.0",
    "synthesize_if_missing=true",
    "ingest.manifest=cohort",
    "ingest.output=ingested",
    "ingest.crop_size=16",
    "ingest.crop_spacing_mm=2.0",
    "ingest.patch_size=8",
    "ingest.volume_shape=[8,16,16]",
    "ingest.radiograph_size=16",
    "ingest.split.train=0.8",
    "ingest.split.val=0.2",
    "ingest.split.test=0.0",
    "ingest.split.seed=1",
]


# Part 2 (issue 16): each stage a few steps on 2 trajectories per worker and kind.
PART2 = [
    *(
        f"cldm.training.{stage}.{kv}"
        for stage in ("segmentation", "report")
        for kv in ("max_steps=3", "micro_batch_size=2", "checkpoint_every=3", "log_every=3", "warmup_steps=1")
    ),
    *(
        f"cldm.training.{stage}.{kv}"
        for stage in ("diffusion", "regressor")
        for kv in (
            "max_steps=3",
            "micro_batch_3d=1",
            "micro_batch_2d=1",
            "checkpoint_every=3",
            "log_every=3",
            "warmup_steps=1",
        )
    ),
    "cldm.training.forecast_validation.samples=2",
    "cldm.training.forecast_validation.inference_steps=2",
    "cldm.training.forecast_validation.every_epochs=100",
    "cldm.training.tiny_lm.write_if_missing=true",
    "cldm.training.tiny_lm.hidden_size=16",
    "cldm.models.prior_summary=pooled",
]
PART2_STAGES = ("segmentation", "report", "diffusion", "regressor")


def _config(tmp_path):
    overrides = [f"cldm.encoder.{kv}" for kv in TINY] + [
        f"cldm.training.encoder.max_steps={STEPS}",
        "cldm.training.encoder.micro_batch_3d=1",
        "cldm.training.encoder.micro_batch_2d=3",
        "cldm.training.encoder.weight_2d=0.5",
        "cldm.training.encoder.lr=0.003",
        "cldm.training.encoder.warmup_steps=1",
        f"cldm.training.encoder.checkpoint_every={STEPS}",
        "cldm.training.encoder.log_every=2",  # a Ray Train report costs ~1 s
        "cldm.training.validation.every_epochs=100",  # before the first step and at the end
        "cldm.training.validation.cases=2",
        "cldm.training.latent_cache.actors=1",
        "cldm.training.latent_cache.batch_size=4",
        *PART2,
        "cldm.evaluation.split=val",
        "cldm.evaluation.num_samples=2",
        "cldm.evaluation.inference_steps=2",
        "cldm.evaluation.bootstrap=100",
        f"cldm.evaluation.report={tmp_path / 'evaluation'}",
        f"cldm.evaluation.cache={tmp_path / 'evaluation_cache'}",
        "training.scaling.num_workers=2",
        f"workdir={tmp_path}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=cldm-test",
        *COHORT,
    ]
    return load_config(None, overrides)


def test_cldm_job_synthesises_ingests_pretrains_caches_and_a_rerun_skips_everything(ray_session, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _config(tmp_path)
    report = run_cldm(cfg)
    assert {r.name: r.status for r in report.stages} == {
        "encoder": "trained",
        "study_latents": "built",
        **{name: "trained" for name in PART2_STAGES},
    }
    out = report.outputs

    # One parent run, a child per stage; the parent points at the encoder and the cache.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cldm-test").experiment_id
    parent = client.get_run(report.parent_run_id)
    assert parent.data.tags["cohortcast.encoder"] == str(out.encoder)
    assert parent.data.tags["cohortcast.study_latents"] == str(out.latents)
    children = {
        r.data.tags["mlflow.runName"]: r
        for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{report.parent_run_id}'")
    }
    assert set(children) == {"encoder", "study_latents", *PART2_STAGES}
    assert (
        children["study_latents"].data.metrics["rows"] == 20
        and "studies_per_s" in children["study_latents"].data.metrics
    )

    # Both kinds trained, each from its own stream, under one loss; it fell, and the
    # validation loss fell below the untrained encoder's.
    encoder_run = children["encoder"].info.run_id
    metrics = children["encoder"].data.metrics
    for key in ("loss/total", "loss/mim_3d", "loss/mim_2d", "val/mim_3d", "val/mim_2d", "val/mim", "samples_per_s"):
        assert key in metrics, key
    assert sorted(m.step for m in client.get_metric_history(encoder_run, "loss/total")) == [2, 4, 6]
    assert sorted(m.step for m in client.get_metric_history(encoder_run, "val/mim")) == [0, STEPS]
    encoder_report = next(r for r in report.stages if r.name == "encoder")
    assert encoder_report.last_loss < encoder_report.first_loss, (encoder_report.first_loss, encoder_report.last_loss)
    assert metrics["val/mim"] < metrics["val/mim_step0"], (metrics["val/mim_step0"], metrics["val/mim"])
    assert metrics["val/mim_3d_baseline"] > 0 and metrics["val/mim_2d_baseline"] > 0
    artifacts = {a.path for a in client.list_artifacts(encoder_run, "validation")}
    for kind in ("3d", "2d"):  # CT slices and radiographs, before training and at the end
        assert f"validation/epoch000_step00000_reconstruction_{kind}.png" in artifacts, artifacts
        assert any(p.endswith(f"step{STEPS:05d}_reconstruction_{kind}.png") for p in artifacts), artifacts

    # The export loads and differs from the initial weights in both patch embeddings
    # and the shared blocks (the stage loop seeds with stage.seed before building).
    trained = UniversalEncoder.load(out.encoder)
    seed_everything(cfg.cldm.training.encoder.seed)
    initial = UniversalEncoder(cfg.cldm.encoder).state_dict()
    for name in ("patch_embed_3d.proj.weight", "patch_embed_2d.proj.weight", "blocks.0.attn.qkv.weight"):
        assert not torch.equal(trained.state_dict()[name], initial[name]), name

    # One table per dimensionality, partitioned by split; ids, dates and measures kept.
    studies = {d: pq.read_table(f"{out.latents}/studies/dims={d}").to_pandas() for d in (3, 2)}
    assert {d: len(t) for d, t in studies.items()} == {3: 10, 2: 10}
    assert {d: np.asarray(t.tokens.iloc[0]).shape for d, t in studies.items()} == {3: (2 * 2 * 2, 32), 2: (4 * 4, 32)}
    for dims, table in studies.items():
        assert set(table["split"]) == {"train", "val"}
        assert {"patient", "study", "study_date", "days_since_baseline", "exam_index", "modality"} <= set(table)
        assert {"has_mask", "lung_voxels", "mask_volume_ml", "lung_volume_ml", "report_text"} <= set(table)
        assert "volume" not in table and "radiograph" not in table
        assert set(table["modality"]) == ({"CT"} if dims == 3 else {"DX"})
    assert (studies[3].lung_voxels > 0).all() and (studies[2].report_text.str.contains("IMPRESSION:")).all()

    # Part 2: every stage wrote its model and validated; the training output is one
    # forecaster (what serving and the cohort job load) that forecasts a mask and a report.
    for name in PART2_STAGES:
        assert getattr(out, name).is_dir(), name
    diffusion = children["diffusion"].data.metrics
    for key in ("loss/diffusion_3d", "loss/diffusion_2d", "val/best_avd", "val/avd", "val/copy_last_avd"):
        assert key in diffusion, (key, sorted(diffusion))
    bundle = CLDMBundle.load(out.diffusion.parent)
    assert bundle.info()["segmentation"] and bundle.info()["report"] and bundle.info()["regressor"]
    rng = np.random.default_rng(0)
    ct = bundle.forecast([[(rng.uniform(-1, 1, (8, 16, 16)).astype(np.float32), 200.0)]], ["c"], 2, steps=2)[0]
    assert ct.mask.shape == (8, 16, 16) and ct.sample_voxels.shape == (2,)
    dx = bundle.forecast(
        [[(rng.uniform(-1, 1, (16, 16)).astype(np.float32), 200.0)]], ["r"], 2, steps=2, kind="radiograph"
    )
    assert isinstance(dx[0].report, str)

    # The evaluation job on the trained models: nothing retrained, Tables 1-2 and claims.
    evaluation = run_cldm_evaluation(cfg)
    assert evaluation.table1.targets >= 1 and evaluation.table2.targets >= 1
    assert evaluation.table1.row("CLDM (all priors)") is not None and evaluation.claims
    assert "## Table 1" in (tmp_path / "evaluation" / "report.md").read_text()

    # The cohort forecasting job on the real ingested table: every val follow-up of both kinds.
    job = cfg.cldm.forecast
    job.model, job.ingested, job.output = (
        str(out.diffusion.parent),
        str(tmp_path / "ingested"),
        str(tmp_path / "forecasts"),
    )
    job.split, job.num_samples, job.inference_steps = "val", 2, 2
    summary = run_cldm_cohort_forecast(job)
    assert summary["cases_by_kind"] == {"ct": 1, "radiograph": 1} and summary["finished"] == 2
    forecasts = read_cldm_forecasts(job.output)
    assert (
        forecasts["ct"].column("target_voxels")[0].as_py() > 0 and forecasts["radiograph"].column("report")[0].as_py()
    )

    # A rerun: the cohort is there, the ingestion reused, every stage up to date.
    again = run_cldm(cfg)
    assert {r.name: r.status for r in again.stages} == {name: "up to date" for name in {r.name for r in report.stages}}
    assert again.outputs == out
