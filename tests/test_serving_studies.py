"""Whole-study forecasts without Serve: an uploaded NIfTI, DICOM files or a .zip of a
series gives exactly the crop ingestion cut from the same study; unreadable uploads and
centres outside the image are 400s naming the field, without echoing file names; the
NIfTI download sits on the study's patient-space grid; the evaluator's per-sample
probabilities; Forecasters served from an MLflow model URI."""

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cohortcast.config import IngestConfig
from cohortcast.data.ingest import build_tasks
from cohortcast.data.manifest import load_manifest
from cohortcast.data.privacy import Pseudonymizer
from cohortcast.data.study_processing import process_study
from cohortcast.serving.requests import RequestError
from cohortcast.serving.studies import StudyForecastRequest, Upload, nifti_zip, study_crop

INGEST = IngestConfig(crop_size=32, crop_spacing_mm=1.5)
LIMIT = 64 * 2**20


def tasks_by_format(cohort: Path) -> dict[str, dict]:
    """One task (with its ingested crops) per study format of the tiny cohort."""
    found = {}
    for task in build_tasks(load_manifest(cohort), Pseudonymizer("t"), INGEST):
        if not json.loads(task["findings_json"]):
            continue
        kind = "nifti" if task["path"].endswith((".nii", ".nii.gz")) else "dicom"
        found.setdefault(kind, task)
    assert set(found) == {"nifti", "dicom"}
    return found


def uploads_of(path: Path, as_zip: bool) -> list[Upload]:
    if path.is_file():
        return [Upload(path.name, path.read_bytes())]
    files = sorted(p for p in path.iterdir() if p.is_file())
    if not as_zip:
        return [Upload(p.name, p.read_bytes()) for p in files]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for p in files:
            archive.write(p, f"../../evil/{p.name}")  # hostile member paths must not escape
    return [Upload("series.zip", buffer.getvalue())]


def settings(task: dict, **kw) -> StudyForecastRequest:
    finding = json.loads(task["findings_json"])[0]
    centre = [finding[f"center_{a}_mm"] for a in "xyz"]
    return StudyForecastRequest(center_lps_mm=centre, horizon_days=365, **kw)


@pytest.mark.parametrize("kind, as_zip", [("nifti", False), ("dicom", False), ("dicom", True)])
def test_uploaded_study_gives_the_ingested_crop(tiny_cohort, kind, as_zip):
    task = tasks_by_format(tiny_cohort)[kind]
    ingested = process_study(task, INGEST)["crops"][0]
    cut = study_crop(uploads_of(Path(task["path"]), as_zip), settings(task), INGEST, LIMIT)
    np.testing.assert_allclose(cut.crop, ingested, atol=1e-6)


def test_centre_given_as_voxel_indices(tiny_cohort):
    from cohortcast.data.readers import read_study

    task = tasks_by_format(tiny_cohort)["nifti"]
    by_mm = settings(task)
    ijk = read_study(task["path"]).world_to_voxel(np.asarray([by_mm.center_lps_mm]))[0]
    by_voxel = StudyForecastRequest(center_voxel=ijk.tolist(), horizon_days=365)
    uploads = uploads_of(Path(task["path"]), False)
    np.testing.assert_allclose(
        study_crop(uploads, by_voxel, INGEST, LIMIT).crop, study_crop(uploads, by_mm, INGEST, LIMIT).crop, atol=1e-5
    )
    with pytest.raises(ValueError, match="exactly one"):
        StudyForecastRequest(horizon_days=365)


def test_bad_uploads_are_errors_naming_the_field_not_the_file(tiny_cohort, tmp_path):
    task = tasks_by_format(tiny_cohort)["nifti"]
    secret_name = "DOE^JANE_1234.nii.gz"
    cases = [
        ([Upload(secret_name, b"\x1f\x8b not really gzip")], "study"),
        ([Upload("x.zip", b"PK no zip")], "study"),
        ([Upload("a.dcm", b"not dicom at all")], "study"),
        ([], "study"),
        ([Upload(secret_name, b"x" * 100)] * 2, "study"),
    ]
    for uploads, field in cases:
        with pytest.raises(RequestError) as info:
            study_crop(uploads, settings(task), INGEST, LIMIT)
        assert info.value.field == field and "DOE" not in info.value.message and str(tmp_path) not in info.value.message
    with pytest.raises(RequestError, match="limit"):
        study_crop(uploads_of(Path(task["path"]), False), settings(task), INGEST, max_bytes=10)
    far = StudyForecastRequest(center_lps_mm=[1e4, 0, 0], horizon_days=365)
    with pytest.raises(RequestError) as info:
        study_crop(uploads_of(Path(task["path"]), False), far, INGEST, LIMIT)
    assert info.value.field == "center_lps_mm" and "outside" in info.value.message


def test_nifti_download_lies_on_the_study_grid(tmp_path):
    from cohortcast.inference.forecast_outputs import to_hu
    from cohortcast.io.crop import axial_grid_affine

    rng = np.random.default_rng(0)
    mean, variance = rng.uniform(-1, 1, (32, 32)).astype(np.float32), rng.uniform(0, 1, (32, 32)).astype(np.float32)
    samples = rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    centre = np.array([10.0, -20.0, 55.0])
    affine = axial_grid_affine(centre, 32, INGEST.crop_spacing_mm)  # what study_crop gives for a CT volume
    with zipfile.ZipFile(io.BytesIO(nifti_zip(mean, variance, samples, affine, INGEST))) as archive:
        assert sorted(archive.namelist()) == ["mean.nii.gz", "samples.nii.gz", "variance.nii.gz"]
        archive.extractall(tmp_path)
    from cohortcast.data.nifti_reader import read_nifti

    volume = read_nifti(tmp_path / "mean.nii.gz")
    np.testing.assert_allclose(volume.array[0], to_hu(mean, INGEST.hu_window, INGEST.normalise), atol=1e-3)
    # The crop's middle (between pixels 15 and 16) is the nodule centre, in LPS mm.
    np.testing.assert_allclose(volume.voxel_to_world(np.array([[15.5, 15.5, 0.0]]))[0], centre, atol=1e-6)
    np.testing.assert_allclose(volume.spacing[:2], [1.5, 1.5])
    assert nib.load(str(tmp_path / "samples.nii.gz")).shape == (32, 32, 1, 3)


def test_evaluator_scores_every_sample_once():
    from cohortcast.config.evaluation import EvaluatorConfig
    from cohortcast.models.evaluator import MalignancyEvaluator
    from cohortcast.serving.forecast_model import score_samples

    torch.manual_seed(0)
    evaluator = MalignancyEvaluator.build(EvaluatorConfig(), image_size=32).eval()
    rng = np.random.default_rng(1)
    shared = {"samples": rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32)}
    other = {"samples": rng.uniform(-1, 1, (2, 32, 32)).astype(np.float32)}
    score_samples(evaluator, [shared, other, shared], micro_batch=2)  # a duplicate request shares its answer
    with torch.no_grad():
        direct = torch.sigmoid(evaluator(torch.from_numpy(shared["samples"])[:, None])).numpy()
    np.testing.assert_allclose(shared["malignancy_probability"], direct, atol=1e-6)
    assert len(shared["malignancy_probability"]) == 3 and len(other["malignancy_probability"]) == 2


def test_forecaster_from_an_mlflow_model_uri(tmp_path, monkeypatch):
    import mlflow

    from cohortcast.config.models import ForecasterConfig
    from cohortcast.io.stage_outputs import write_marker
    from cohortcast.models.forecaster import Forecaster
    from cohortcast.serving.model_source import resolve_forecaster
    from cohortcast.tracking.forecaster_pyfunc import log_forecaster

    folder = tmp_path / "ldm_cond"
    Forecaster(ForecasterConfig()).save(folder)
    write_marker(folder, "key-123", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("serve-uri")
    with mlflow.start_run() as run:
        log_forecaster(str(folder), registry_name="namd-serve-test")
    for uri in ("models:/namd-serve-test/1", f"runs:/{run.info.run_id}/forecaster"):
        source = resolve_forecaster(uri, download_root=tmp_path / "download" / uri.split(":")[0])
        assert source.mlflow_run_id == run.info.run_id
        assert Forecaster.load(source.folder) is not None
        assert source.info()["model_version"] == "key-123"
    assert resolve_forecaster("models:/namd-serve-test/1").registered == {"name": "namd-serve-test", "version": "1"}
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_forecaster(str(tmp_path / "missing"))
