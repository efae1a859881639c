"""The CLDM job's stages after ingestion on a tiny ingested cohort (tests/cldm_fixtures.py):
the encoder pre-trains on Ray Train + DeepSpeed (ZeRO-2, 2 CPU workers) with separate
volume and radiograph micro-batches, logs both losses, validation and reconstruction
grids to its MLflow child run and exports a loadable encoder with new weights; the study
latent cache is built on a Ray Data actor pool with one table per dimensionality; a
rerun finds both up to date. The only test of issue 15's job that starts Ray."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from cldm_fixtures import write_ingested_studies

from cohortcast.config import load_config
from cohortcast.config.paths import resolve_paths
from cohortcast.models.universal_encoder import UniversalEncoder
from cohortcast.pipeline.cldm import CLDMJob
from cohortcast.tracking.job_runs import JobRuns
from cohortcast.training.deepspeed_setup import seed_everything

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

STEPS = 6
VOLUME, RADIOGRAPH = (8, 16, 16), 16
TINY = ["dim=32", "depth=1", "heads=2", "decoder_dim=16", "decoder_heads=2", "patch_2d=[4,4]", "patch_3d=[4,8,8]"]


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
        "training.scaling.num_workers=2",
        f"workdir={tmp_path}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=cldm-test",
    ]
    return resolve_paths(load_config(None, overrides))


def _run(cfg, card):
    job = CLDMJob(cfg)
    with JobRuns(cfg) as runs:
        encoder, cache = job.run(runs, card)
    return job, runs, encoder, cache


def test_encoder_stage_and_study_latent_cache_train_build_and_are_reused(ray_session, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    card = write_ingested_studies(tmp_path / "ingested", VOLUME, RADIOGRAPH, {"train": 4, "val": 1}, exams=2)
    cfg = _config(tmp_path)
    job, runs, encoder, cache = _run(cfg, card)
    status = {r.name: r.status for r in job.reports}
    assert status == {"encoder": "trained", "study_latents": "built"}

    # Both kinds trained, each from its own stream, under one loss; it fell.
    child = {r.data.tags["mlflow.runName"]: r for r in runs.client.search_runs([runs.experiment_id])}
    metrics = child["encoder"].data.metrics
    for key in ("loss/total", "loss/mim_3d", "loss/mim_2d", "val/mim_3d", "val/mim_2d", "val/mim", "samples_per_s"):
        assert key in metrics, key
    history = runs.client.get_metric_history(child["encoder"].info.run_id, "loss/total")
    assert sorted(m.step for m in history) == [2, 4, 6]
    # validated before the first step (the untrained encoder's loss) and at the end
    val_history = runs.client.get_metric_history(child["encoder"].info.run_id, "val/mim")
    assert sorted(m.step for m in val_history) == [0, STEPS]
    assert metrics["val/mim"] < metrics["val/mim_step0"], (metrics["val/mim_step0"], metrics["val/mim"])
    assert metrics["val/mim_3d_baseline"] > 0 and metrics["val/mim_2d_baseline"] > 0
    report = next(r for r in job.reports if r.name == "encoder")
    assert report.last_loss < report.first_loss, (report.first_loss, report.last_loss)
    artifacts = {a.path for a in runs.client.list_artifacts(child["encoder"].info.run_id, "validation")}
    for kind in ("3d", "2d"):  # CT slices and radiographs, before training and at the end
        assert {f"validation/epoch000_step00000_reconstruction_{kind}.png"} < artifacts, artifacts
        assert any(p.endswith(f"step{STEPS:05d}_reconstruction_{kind}.png") for p in artifacts), artifacts

    # The export loads and differs from the initial weights in both patch embeddings
    # and the shared blocks (the stage loop seeds with stage.seed before building).
    trained = UniversalEncoder.load(encoder)
    seed_everything(cfg.cldm.training.encoder.seed)
    initial = UniversalEncoder(cfg.cldm.encoder).state_dict()
    for name in ("patch_embed_3d.proj.weight", "patch_embed_2d.proj.weight", "blocks.0.attn.qkv.weight"):
        assert not torch.equal(trained.state_dict()[name], initial[name]), name

    # One table per dimensionality, partitioned by split; ids, dates and measures kept.
    studies = {d: pq.read_table(f"{cache['path']}/studies/dims={d}").to_pandas() for d in (3, 2)}
    assert cache["rows"] == {"3": 10, "2": 10} and {d: len(t) for d, t in studies.items()} == {3: 10, 2: 10}
    assert cache["tokens"] == {"3": [2 * 2 * 2, 32], "2": [4 * 4, 32]}  # (8, 16, 16) / (4, 8, 8); 16 / 4
    for dims, table in studies.items():
        assert set(table["split"]) == {"train", "val"}
        assert {"patient", "study", "study_date", "days_since_baseline", "exam_index", "modality"} <= set(table)
        assert {"has_mask", "lung_voxels", "mask_volume_ml", "lung_volume_ml", "report_text"} <= set(table)
        assert "volume" not in table and "radiograph" not in table
        assert set(table["modality"]) == ({"CT"} if dims == 3 else {"DX"})

    # A rerun: the encoder is up to date, the cache reused.
    again, _, encoder_again, cache_again = _run(cfg, card)
    assert {r.name: r.status for r in again.reports} == {"encoder": "up to date", "study_latents": "up to date"}
    assert cache_again["reused"] and cache_again["path"] == cache["path"] and encoder_again == encoder
