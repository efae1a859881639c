"""Issue 13: the Forecaster carries the crop preprocessing it was trained with (format 3);
format-2 folders still load (without it) and callers fall back to their ingest settings;
the pipeline records it from the ingested cohort's card; cohort forecasting refuses a
cohort cut otherwise; MLflow params of nested configs have single dots."""

import json
import logging
from pathlib import Path

import pytest

from conftest import forecaster_config

from cohortcast.config import IngestConfig, flatten
from cohortcast.config.schema import CohortcastConfig
from cohortcast.models.forecaster import FORMAT_VERSION, Forecaster, read_preprocessing
from cohortcast.models.preprocessing import CropPreprocessing

TRAINED = CropPreprocessing(32, 1.5, (-1100.0, 500.0), "zero_one")


def saved(folder: Path, preprocessing=TRAINED) -> Path:
    Forecaster(forecaster_config(), preprocessing=preprocessing).save(folder)
    return folder


def as_format_2(folder: Path) -> Path:
    """What cohortcast wrote before the preprocessing was recorded."""
    meta = json.loads((folder / "forecaster.json").read_text())
    meta["format_version"] = 2
    del meta["preprocessing"]
    (folder / "forecaster.json").write_text(json.dumps(meta))
    return folder


def test_preprocessing_round_trips_with_the_forecaster(tmp_path):
    folder = saved(tmp_path / "fc")
    meta = json.loads((folder / "forecaster.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert meta["preprocessing"] == {
        "crop_size": 32,
        "crop_spacing_mm": 1.5,
        "hu_window": [-1100.0, 500.0],
        "normalise": "zero_one",
    }
    assert Forecaster.load(folder).preprocessing == TRAINED == read_preprocessing(folder)


def test_format_2_folder_loads_without_preprocessing_and_warns(tmp_path, caplog):
    folder = as_format_2(saved(tmp_path / "fc"))
    with caplog.at_level(logging.WARNING, logger="cohortcast.models.forecaster"):
        model = Forecaster.load(folder)
    assert model.preprocessing is None and read_preprocessing(folder) is None
    assert "saved without its crop preprocessing" in caplog.text


def test_crop_size_must_be_the_vae_input_size(tmp_path):
    with pytest.raises(ValueError, match="crop_size 64 does not match.*sample_size 32"):
        Forecaster(forecaster_config(), preprocessing=CropPreprocessing(64, 0.75, (-1000.0, 400.0), "zero_one"))
    model = Forecaster(forecaster_config())
    model.preprocessing = CropPreprocessing(64, 0.75, (-1000.0, 400.0), "zero_one")
    with pytest.raises(ValueError, match="sample_size"):
        model.save(tmp_path / "fc")


def test_pipeline_records_the_ingested_cohorts_preprocessing(tmp_path):
    from cohortcast.config import to_dict
    from cohortcast.pipeline.namd import NAMDJob

    ingested = tmp_path / "ingested"
    ingested.mkdir()
    card_config = to_dict(
        IngestConfig(crop_size=32, crop_spacing_mm=1.5, hu_window=(-1100.0, 500.0), normalise="zero_one")
    )
    (ingested / "card.json").write_text(json.dumps({"config": card_config}))
    job = NAMDJob(CohortcastConfig())  # its ingest section (64 px) is not what the cache was encoded from
    assert job.training_preprocessing({"ingested": str(ingested), "path": "cache"}) == TRAINED
    assert job.training_preprocessing({"path": "cache"}) == CropPreprocessing.from_ingest(IngestConfig())


def test_serving_takes_the_models_preprocessing_before_its_ingest_config():
    from cohortcast.serving.model_source import study_preprocessing

    default = IngestConfig()  # 64 px
    info = {"forecaster": "m", "crop_shape": [32, 32], "preprocessing": TRAINED.to_dict()}
    assert study_preprocessing(info, default) == (TRAINED, None)
    old = {"forecaster": "old", "crop_shape": [32, 32], "preprocessing": None}
    geometry, problem = study_preprocessing(old, default)
    assert geometry is None and "saved without its crop preprocessing" in problem and "64" in problem
    matching = IngestConfig(crop_size=32, crop_spacing_mm=1.5)
    assert study_preprocessing(old, matching) == (CropPreprocessing.from_ingest(matching), None)


def test_cohort_forecasting_refuses_a_cohort_cut_otherwise(tmp_path):
    from cohortcast.config import to_dict
    from cohortcast.inference.cohort_forecast import PreprocessingMismatch, cohort_preprocessing, ingest_for_forecaster

    folder = str(saved(tmp_path / "fc"))
    other = {"config": to_dict(IngestConfig(crop_size=32, crop_spacing_mm=0.75, output="ingested"))}
    with pytest.raises(PreprocessingMismatch, match="crop_spacing_mm: 1.5 vs 0.75"):
        cohort_preprocessing(folder, other)
    same = {"config": to_dict(TRAINED.applied_to(IngestConfig()))}
    assert cohort_preprocessing(folder, same) == TRAINED
    # Ingesting for this Forecaster cuts its crops, keeping the rest of the config.
    ingest = ingest_for_forecaster(IngestConfig(output="somewhere"), folder)
    assert CropPreprocessing.from_ingest(ingest) == TRAINED and ingest.output == "somewhere"
    old = str(as_format_2(saved(tmp_path / "old")))
    assert cohort_preprocessing(old, other) == CropPreprocessing.from_ingest(other["config"])  # the fallback
    assert ingest_for_forecaster(IngestConfig(), old) == IngestConfig()


def test_stage_params_have_single_dots(monkeypatch):
    """The ldm_uncond stage logged `model.denoiser..block_out_channels`."""
    from cohortcast.pipeline.namd import NAMDJob

    job = NAMDJob(CohortcastConfig())
    logged = {}
    monkeypatch.setattr(job.runner, "train", lambda runs, name, key, *args, **kw: logged.setdefault(name, args[4]))
    job.stage_ldm_uncond(None, {"key": "k", "path": "cache"})
    job.stage_vae(None, {"fingerprint": "f", "config": {"output": "ingested"}})
    names = [*logged["ldm_uncond"], *logged["vae"], *flatten(CohortcastConfig())]
    assert "model.denoiser.block_out_channels" in logged["ldm_uncond"]
    assert "model.vae.block_out_channels" in logged["vae"]
    assert not [n for n in names if ".." in n or n.startswith(".") or n.endswith(".")]
    assert flatten({"b": {"c": 1}}, "a.") == {"a.b.c": 1}
