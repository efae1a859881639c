"""Cohort forecasting on a Ray Data actor pool: resumable per case, reproducible by seed,
outputs on the source geometry."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import forecaster_config

from cohortcast.config.models import ConditionerConfig, SchedulerConfig
from cohortcast.config.training import ForecastJobConfig
from cohortcast.data.nifti_reader import read_nifti
from cohortcast.data.readers import read_study
from cohortcast.errors import MissingInputError
from cohortcast.inference.cohort_forecast import (
    ForecastSettingsMismatch,
    case_key,
    finished_cases,
    read_forecasts,
    run_cohort_forecast,
)
from cohortcast.inference.forecast_outputs import to_hu
from cohortcast.io.crop import axial_grid_affine
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.tiny_llm import write_tiny_gemma3

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def forecaster_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecaster")
    llm = write_tiny_gemma3(root / "llm", ["solid nodule right upper lobe long axis mm"])
    torch.manual_seed(0)
    cfg = forecaster_config(
        conditioner=ConditionerConfig(llm_path=str(llm), num_soft_prompts=2, max_length=64),
        scheduler=SchedulerConfig(micro_batch=4),
    )
    Forecaster(cfg).save(root / "model")
    return str(root / "model")


def job(forecaster_folder, ingested, output, **kw):
    base = dict(
        forecaster=forecaster_folder,
        ingested=str(ingested),
        split="train",
        output=str(output),
        num_samples=2,
        inference_steps=3,
        seed=5,
        cases_per_batch=2,
        write_dicom=True,
    )
    return ForecastJobConfig(**{**base, **kw})


def test_interrupted_run_resumes_without_duplicates_or_gaps(ray_session, tiny_ingested, forecaster_folder, tmp_path):
    first = run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path, max_cases=2))
    assert first["forecast_this_run"] == 2 and first["finished"] == 2 and first["cases"] > 2
    # the actors' own time per case and their threads, beside the wall time
    assert 0 < first["actor_seconds_per_case"] <= first["wall_seconds"] and first["actor_torch_threads"]
    assert first["actor_nodes"] == 1  # the session's one-node instance (3 nodes: test_multinode.py)
    # where the time went: models + writing make up the actors' time per case
    assert 0 < first["model_seconds_per_case"] < first["actor_seconds_per_case"]
    assert first["write_seconds_per_case"] == pytest.approx(
        first["actor_seconds_per_case"] - first["model_seconds_per_case"]
    )
    assert first["actor_load_seconds"] > 0 and first["prepare_seconds"] > 0
    kept = {k: os.stat(tmp_path / "cases" / k / "forecast.parquet").st_mtime_ns for k in finished_cases(tmp_path)}
    # What an interrupted case leaves behind: a half-written temp folder, never a case.
    stale = tmp_path / "cases" / ".deadbeef.tmp-x1"
    stale.mkdir()
    (stale / "mean.nii.gz").write_bytes(b"partial")
    second = run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path))
    assert second["forecast_this_run"] == first["cases"] - 2 and second["finished"] == first["cases"]
    assert not stale.exists()
    table = read_forecasts(tmp_path)
    ids = table.column("case_id").to_pylist()
    assert len(ids) == len(set(ids)) == first["cases"]
    assert {k: os.stat(tmp_path / "cases" / k / "forecast.parquet").st_mtime_ns for k in kept} == kept  # untouched
    third = run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path))
    assert third["forecast_this_run"] == 0 and third["actor_seconds_per_case"] == 0.0


def test_cases_match_ray_data_grouping_the_nodules_table(ray_session, tiny_ingested):
    """read_cases builds the case table on the driver: the same rows as grouping the
    nodules table per (patient, nodule) on Ray Data and applying make_case."""
    import ray.data

    from cohortcast.inference.cohort_forecast import make_case, read_cases

    mine = read_cases(tiny_ingested, "train")
    reference = (
        ray.data.read_parquet(str(tiny_ingested / "nodules" / "split=train"))
        .drop_columns(["patch"])
        .groupby(["patient", "nodule_id"])
        .map_groups(make_case, batch_format="numpy")
        .to_pandas()
        .sort_values("case_id")
    )
    order = np.argsort(mine["case_id"])
    assert len(order) == len(reference) >= 3 and set(mine) == set(reference.columns)
    for column, values in mine.items():
        expected = np.stack(reference[column].to_numpy()) if values.ndim > 1 else reference[column].to_numpy()
        np.testing.assert_array_equal(values[order], expected.astype(values.dtype), err_msg=column)


def test_case_blocks_carry_every_column_whatever_its_width(ray_session):
    """Blocks whose string columns differ in length still combine (numpy string scalars
    would give each block its own fixed-width Arrow type), and values round-trip."""
    from cohortcast.inference.cohort_forecast import case_blocks

    cases = {
        "case_id": np.asarray(["p1/n1", "p2/n1", "a-much-longer-patient-pseudonym/n2", "p4/n3"]),
        "ehr_json": np.asarray(['{"age": 61}', '{"age": 7, "gender": "Female", "famfather": "Yes"}', "{}", '{"a": 1}']),
        "horizon_days": np.asarray([365.0, 30.5, 1.0, 700.0]),
        "malignant": np.asarray([0, 1, 0, 1]),
        "baseline": np.arange(4 * 3 * 3, dtype=np.float32).reshape(4, 3, 3),
    }
    blocks = case_blocks(cases, np.asarray([3, 0, 2, 1]), cases_per_batch=2, actors=1)
    assert blocks.num_blocks() == 2
    # one batch of both two-case blocks: Ray Data combines them, as it does for the actor pool
    table = blocks.map_batches(lambda batch: batch, batch_size=4, batch_format="numpy").to_pandas()
    assert list(table["case_id"]) == ["p4/n3", "p1/n1", "a-much-longer-patient-pseudonym/n2", "p2/n1"]
    assert list(table["ehr_json"]) == list(cases["ehr_json"][[3, 0, 2, 1]])
    np.testing.assert_array_equal(table["horizon_days"], cases["horizon_days"][[3, 0, 2, 1]])
    np.testing.assert_array_equal(np.stack(table["baseline"]), cases["baseline"][[3, 0, 2, 1]])


def test_a_split_without_follow_ups_has_no_cases(tiny_ingested, tmp_path):
    """Nodules seen once give no case; the columns are still there to count (0)."""
    import pyarrow.dataset as pads

    from cohortcast.inference.cohort_forecast import read_cases

    table = pads.dataset(str(tiny_ingested / "nodules" / "split=train"), format="parquet").to_table()
    nodules = list(zip(table.column("patient").to_pylist(), table.column("nodule_id").to_pylist()))
    first_rows = sorted({nodule: i for i, nodule in reversed(list(enumerate(nodules)))}.values())
    first_exams = table.take(first_rows)  # every nodule once
    folder = tmp_path / "nodules" / "split=train"
    folder.mkdir(parents=True)
    pq.write_table(first_exams, folder / "part.parquet")
    assert len(read_cases(tmp_path, "train")["case_id"]) == 0
    empty = tmp_path / "nodules" / "split=test"
    empty.mkdir()
    assert len(read_cases(tmp_path, "test")["case_id"]) == 0  # a split folder without files
    with pytest.raises(MissingInputError, match="no 'val' split"):
        read_cases(tmp_path, "val")


def test_forecasts_reproducible_by_seed_whatever_the_batching(ray_session, tiny_ingested, forecaster_folder, tmp_path):
    run_cohort_forecast(
        job(forecaster_folder, tiny_ingested, tmp_path / "a", cases_per_batch=3, max_cases=3, write_dicom=False)
    )
    run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path / "b", cases_per_batch=1, write_dicom=False))
    run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path / "c", seed=6, max_cases=3, write_dicom=False))
    a, b, c = (read_forecasts(tmp_path / x) for x in "abc")
    means = {
        x: dict(zip(t.column("case_id").to_pylist(), t.column("mean").combine_chunks().to_numpy_ndarray()))
        for x, t in zip("abc", (a, b, c))
    }
    shared = set(means["a"]) & set(means["c"])
    assert len(means["a"]) == 3 and shared
    for case in means["a"]:
        np.testing.assert_array_equal(means["a"][case], means["b"][case])  # bit-identical
    assert all(not np.allclose(means["a"][k], means["c"][k]) for k in shared)  # another seed, another forecast
    assert a.column("samples").type.shape == [2, 32, 32]
    # Forecasting into a folder that holds another seed's cases is refused, not mixed.
    with pytest.raises(ForecastSettingsMismatch, match="seed: 5 -> 6"):
        run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path / "a", seed=6, write_dicom=False))
    assert read_forecasts(tmp_path / "a").num_rows == 3


def test_outputs_sit_on_the_source_geometry_and_carry_pseudonyms(
    ray_session, tiny_ingested, forecaster_folder, tmp_path
):
    run_cohort_forecast(job(forecaster_folder, tiny_ingested, tmp_path, max_cases=1))
    [key] = finished_cases(tmp_path)
    row = pq.read_table(tmp_path / "cases" / key / "forecast.parquet")
    case_id = row.column("case_id")[0].as_py()
    assert key == case_key(case_id) and case_id.startswith("sub-")
    nodules = pq.read_table(tiny_ingested / "nodules").to_pandas()
    source = nodules[(nodules.patient + "/" + nodules.nodule_id) == case_id].sort_values("days_since_baseline").iloc[0]
    centre = [source.center_x_mm, source.center_y_mm, source.center_z_mm]
    expected = axial_grid_affine(centre, 32, 1.5)  # tiny_ingested: CT, 32 px crops at 1.5 mm
    # the baseline crop's own grid, stored by ingestion, is what the outputs carry
    np.testing.assert_allclose(np.asarray(source.crop_affine).reshape(4, 4), expected, atol=1e-9)
    mean = row.column("mean").combine_chunks().to_numpy_ndarray()[0]

    nifti = read_nifti(tmp_path / "cases" / key / "mean.nii.gz")
    np.testing.assert_allclose(nifti.affine, expected, atol=1e-4)
    np.testing.assert_allclose(nifti.array[0], to_hu(mean, (-1000.0, 400.0), "minus_one_one"), atol=1e-3)
    # The crop grid really is where ingestion sampled: voxel (col 0, row 0) is the
    # crop's first sample, centre +- half the field of view in x and y.
    np.testing.assert_allclose(nifti.voxel_to_world([15.5, 15.5, 0])[0], centre, atol=1e-4)

    dicom = read_study(tmp_path / "cases" / key / "dicom")
    np.testing.assert_allclose(dicom.affine[:3, :2], expected[:3, :2], atol=1e-4)  # in-plane axes and spacing
    np.testing.assert_allclose(dicom.affine[:3, 3], expected[:3, 3], atol=1e-4)  # position
    np.testing.assert_allclose(dicom.array[0], np.clip(np.rint(nifti.array[0] + 1024), 0, 4095) - 1024, atol=1e-3)
    import pydicom

    header = pydicom.dcmread(next((tmp_path / "cases" / key / "dicom").glob("*.dcm")))
    assert header.PatientID == header.PatientName == case_id.split("/")[0]
    assert not header.PatientBirthDate and not header.AccessionNumber and not header.InstitutionName
    assert "DERIVED" in header.ImageType


def test_forecast_job_over_a_manifest_ingests_it_first(ray_session, tiny_cohort, forecaster_folder, tmp_path):
    from cohortcast.config import IngestConfig, SplitConfig, load_config
    from cohortcast.inference.cohort_forecast import forecast_cohort

    cfg = load_config(None)
    cfg.workdir = str(tmp_path)
    cfg.ingest = IngestConfig(
        manifest=str(tiny_cohort),
        output=str(tmp_path / "ingested"),
        crop_size=32,
        crop_spacing_mm=1.5,
        patch_size=8,
        volume_shape=(8, 16, 16),
        split=SplitConfig(1.0, 0.0, 0.0),
    )
    cfg.forecast = job(forecaster_folder, tmp_path / "ingested", tmp_path / "out", max_cases=1, write_dicom=False)
    summary = forecast_cohort(cfg)
    assert (tmp_path / "ingested" / "card.json").is_file()
    assert summary["forecast_this_run"] == 1 and summary["cases"] >= 1
