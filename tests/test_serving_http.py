"""The forecasting service on a local Serve instance (CPU, tiny model): every endpoint,
bad inputs, 32 concurrent requests answered exactly as one at a time, reproducibility by
seed, bearer-token authentication on and off, and 503 (not a crash) when overloaded."""

import base64
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from cohortcast.config import IngestConfig
from cohortcast.config.evaluation import EvaluatorConfig
from cohortcast.config.models import ConditionerConfig, SchedulerConfig
from cohortcast.config.serving import ServeConfig
from cohortcast.models.evaluator import MalignancyEvaluator
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.tiny_llm import write_tiny_gemma3
from cohortcast.serving.requests import decode_npy, encode_npy

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    from cldm_fixtures import write_tiny_bundle
    from ray import serve

    from conftest import forecaster_config, free_port

    from cohortcast.serving.app import build_app

    root = tmp_path_factory.mktemp("serve-http")
    llm = write_tiny_gemma3(root / "llm", ["solid nodule right upper lobe long axis mm"])
    torch.manual_seed(0)
    Forecaster(
        forecaster_config(
            conditioner=ConditionerConfig(llm_path=str(llm), num_soft_prompts=2, max_length=64),
            scheduler=SchedulerConfig(micro_batch=4),
        )
    ).save(root / "model")
    MalignancyEvaluator.build(EvaluatorConfig(), image_size=32).save(root / "evaluator")
    port = free_port()

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = dict(
        forecaster=str(root / "model"),
        default_samples=2,
        max_samples=4,
        default_steps=3,
        max_steps=5,
        num_cpus=0.25,
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        cohort_output=str(root / "cohorts"),
        jobs_address=ray_session.test_job_address,
        cohort_roots=[str(tmp_path_factory.getbasetemp())],
    )  # where the tiny_ingested fixture writes
    serve.run(
        build_app(
            ServeConfig(**base, evaluator=str(root / "evaluator"), cldm_model=str(write_tiny_bundle(root / "cldm"))),
            ingest=IngestConfig(crop_size=32, crop_spacing_mm=1.5),
        ),
        name="open",
        route_prefix="/open",
    )
    serve.run(build_app(ServeConfig(**base), token="s3cret"), name="secure", route_prefix="/secure")
    serve.run(
        build_app(ServeConfig(**{**base, "max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1})),
        name="small",
        route_prefix="/small",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def body(seed=0, value=0.1, **kw):
    crop = np.full((32, 32), value, np.float32)
    crop[12:20, 12:20] = 0.8
    return {
        "crop_npy_b64": encode_npy(crop),
        "horizon_days": 365,
        "seed": seed,
        "ehr": {"age": 61, "SCT_LONG_DIA": 8.0},
        **kw,
    }


def test_health_model_info_and_docs(service):
    assert requests.get(f"{service}/open/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{service}/open/v1/model", timeout=30).json()
    assert info["crop_shape"] == [32, 32] and info["uses_ehr"] is True and info["limits"]["max_samples"] == 4
    assert info["evaluator"] is True and info["mlflow_run_id"] is None  # a local folder, not an MLflow model
    paths = requests.get(f"{service}/open/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/forecast", "/v1/forecast/study", "/v1/cohorts", "/v1/cohorts/{job_id}"} <= set(paths)
    assert requests.get(f"{service}/open/docs", timeout=30).status_code == 200


def test_cldm_routes_through_serve(service):
    from cldm_fixtures import VOLUME, random_priors

    info = requests.get(f"{service}/open/v1/cldm/model", timeout=30).json()
    assert info["image_shapes"]["ct"] == list(VOLUME) and info["limits"]["max_samples"] == 4
    priors = random_priors("ct", 1, 2, seed=0)[0]
    request = {
        "kind": "ct",
        "priors": [{"image_npy_b64": encode_npy(image), "days_before_target": days} for image, days in priors],
        "num_samples": 2,
        "steps": 2,
        "seed": 3,
    }
    with ThreadPoolExecutor(4) as pool:  # batched together on the replica, answered as alone
        answers = list(
            pool.map(lambda _: requests.post(f"{service}/open/v1/cldm/forecast", json=request, timeout=120), range(4))
        )
    assert all(a.status_code == 200 for a in answers), answers[0].text
    assert all(a.json() == answers[0].json() for a in answers)
    out = answers[0].json()
    assert decode_npy(out["probability_npy_b64"], "p").shape == VOLUME and len(out["sample_voxels"]) == 2
    assert (
        requests.get(
            f"{service}/secure/v1/cldm/model", headers={"Authorization": "Bearer s3cret"}, timeout=30
        ).status_code
        == 404
    )


def test_forecast_is_reproducible_by_seed(service):
    first = requests.post(f"{service}/open/v1/forecast", json=body(), timeout=120).json()
    again = requests.post(f"{service}/open/v1/forecast", json=body(), timeout=120).json()
    other = requests.post(f"{service}/open/v1/forecast", json=body(seed=1), timeout=120).json()
    assert first == again
    assert decode_npy(first["samples_npy_b64"], "s").shape == (2, 32, 32) and first["steps"] == 3
    assert not np.array_equal(decode_npy(first["mean_npy_b64"], "m"), decode_npy(other["mean_npy_b64"], "m"))
    assert len(first["malignancy_probability"]) == 2 and 0 < first["malignancy_probability_mean"] < 1
    assert base64.b64decode(first["mean_png_b64"]).startswith(b"\x89PNG")


def test_study_upload_answers_json_and_a_nifti_zip(service, tiny_cohort, tmp_path):
    from test_serving_studies import settings, tasks_by_format

    task = tasks_by_format(tiny_cohort)["nifti"]
    path = Path(task["path"])
    form = {"request": settings(task, num_samples=2, steps=2, seed=5).model_dump_json()}
    files = [("study", (path.name, path.read_bytes()))]
    answer = requests.post(f"{service}/open/v1/forecast/study", data=form, files=files, timeout=120)
    assert answer.status_code == 200, answer.text
    assert decode_npy(answer.json()["samples_npy_b64"], "s").shape == (2, 32, 32)
    download = requests.post(f"{service}/open/v1/forecast/study?format=nifti", data=form, files=files, timeout=120)
    assert download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        archive.extractall(tmp_path)
    mean = nib.load(str(tmp_path / "mean.nii.gz"))
    assert mean.shape[:2] == (32, 32)
    bad = requests.post(
        f"{service}/open/v1/forecast/study", data=form, files=[("study", ("x.nii", b"junk"))], timeout=60
    )
    assert bad.status_code == 400 and bad.json()["field"] == "study"
    no_centre = requests.post(
        f"{service}/open/v1/forecast/study", data={"request": '{"horizon_days": 30}'}, files=files, timeout=60
    )
    assert no_centre.status_code == 422 and "exactly one" in no_centre.json()["error"]


def test_32_concurrent_requests_get_their_own_answers(service):
    bodies = [body(seed=i % 4, value=-0.5 + 0.03 * i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda b: requests.post(f"{service}/open/v1/forecast", json=b, timeout=300), bodies))
    assert all(a.status_code == 200 for a in answers)
    for i in (0, 13, 31):  # the same request alone gives the same bits as inside the crowd
        alone = requests.post(f"{service}/open/v1/forecast", json=bodies[i], timeout=120).json()
        assert alone["mean_npy_b64"] == answers[i].json()["mean_npy_b64"]
    assert len({a.json()["case_id"] for a in answers}) == 32


@pytest.mark.parametrize(
    "change, status, field",
    [
        ({"num_samples": 99}, 400, "num_samples"),
        ({"crop_npy_b64": encode_npy(np.zeros((8, 8)))}, 400, "crop_npy_b64"),
        ({"ehr": {"gender": "X"}}, 400, "ehr.gender"),
        ({"horizon_days": -3}, 422, "horizon_days"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(service, change, status, field):
    answer = requests.post(f"{service}/open/v1/forecast", json=body(**change), timeout=60)
    assert answer.status_code == status
    assert field in answer.text


def test_bearer_token(service):
    assert requests.get(f"{service}/secure/v1/model", timeout=30).status_code == 401
    wrong = requests.post(
        f"{service}/secure/v1/forecast", json=body(), headers={"Authorization": "Bearer no"}, timeout=60
    )
    assert wrong.status_code == 401 and wrong.json()["field"] == "Authorization"
    ok = requests.post(
        f"{service}/secure/v1/forecast", json=body(), headers={"Authorization": "Bearer s3cret"}, timeout=120
    )
    assert ok.status_code == 200 and ok.json()["malignancy_probability"] is None  # no evaluator here


def test_overload_is_503_not_a_crash(service):
    slow = body(num_samples=4, steps=5)
    with ThreadPoolExecutor(16) as pool:
        codes = [
            a.status_code
            for a in pool.map(
                lambda _: requests.post(f"{service}/small/v1/forecast", json=slow, timeout=300), range(16)
            )
        ]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1
    assert requests.get(f"{service}/small/healthz", timeout=30).status_code == 200


def test_cohort_job_runs_the_batch_forecast(service, tiny_ingested):
    import time

    outside = requests.post(f"{service}/open/v1/cohorts", json={"ingested": "/nowhere"}, timeout=30)
    assert outside.status_code == 403 and outside.json()["field"] == "ingested"  # not under serve.cohort_roots
    bad = requests.post(f"{service}/open/v1/cohorts", json={"ingested": str(tiny_ingested.parent)}, timeout=30)
    assert bad.status_code == 400 and "card.json" in bad.json()["error"]
    assert requests.get(f"{service}/open/v1/cohorts/cohort-nope", timeout=30).status_code == 404
    assert requests.get(f"{service}/open/v1/cohorts/cohort-0123456789ab", timeout=30).status_code == 404
    job = requests.post(
        f"{service}/open/v1/cohorts",
        json={"ingested": str(tiny_ingested), "split": "train", "num_samples": 1, "steps": 2},
        timeout=60,
    )
    # (503 "No available agent" on a shared machine: another Ray instance holds the agent port 52365)
    assert job.status_code == 202, job.text
    job_id = job.json()["job_id"]
    deadline = time.time() + 400
    while True:
        status = requests.get(f"{service}/open/v1/cohorts/{job_id}", timeout=30).json()
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            break
        time.sleep(3)
    assert status["status"] == "SUCCEEDED", status
    assert status["summary"]["finished"] == status["summary"]["cases"] > 0
    assert status["summary"]["num_samples"] == 1
    assert status["output"] == job_id and str(tiny_ingested) not in str(status)  # no server paths in answers


def test_study_upload_is_cut_as_the_model_was_trained(service, tiny_cohort, tmp_path):
    """Issue 13: a Forecaster saved with its 32 px / 1.5 mm / (-1100, 500) HU preprocessing,
    served with the default (64 px) ingest config, crops uploads as it was trained: 200,
    the crop ingestion cuts with those settings (same content-hash case id), the NIfTI on
    the model's spacing and HU window. Before, every upload was a 500 (ingest.crop_size 64)."""
    from ray import serve
    from test_serving_studies import settings, tasks_by_format

    from conftest import forecaster_config

    from cohortcast.config import IngestConfig
    from cohortcast.data.nifti_reader import read_nifti
    from cohortcast.data.study_processing import process_study
    from cohortcast.inference.forecast_outputs import to_hu
    from cohortcast.models.preprocessing import CropPreprocessing
    from cohortcast.serving.app import build_app

    trained = IngestConfig(crop_size=32, crop_spacing_mm=1.5, hu_window=(-1100.0, 500.0))
    torch.manual_seed(0)
    model = Forecaster(
        forecaster_config(scheduler=SchedulerConfig(micro_batch=4)),
        preprocessing=CropPreprocessing.from_ingest(trained),
    )
    model.save(tmp_path / "model")
    cfg = ServeConfig(
        forecaster=str(tmp_path / "model"), default_samples=2, max_samples=4, default_steps=2, max_steps=5, num_cpus=0
    )  # no CPU reserved: the cohort-job test needs the session's CPUs
    serve.run(build_app(cfg, ingest=IngestConfig()), name="geometry", route_prefix="/geometry")
    try:
        assert IngestConfig().crop_size == 64
        info = requests.get(f"{service}/geometry/v1/model", timeout=30).json()
        assert info["preprocessing"] == CropPreprocessing.from_ingest(trained).to_dict()
        task = tasks_by_format(tiny_cohort)["nifti"]
        path = Path(task["path"])
        form = {"request": settings(task, num_samples=2, steps=2, seed=3).model_dump_json()}
        files = [("study", (path.name, path.read_bytes()))]
        answer = requests.post(f"{service}/geometry/v1/forecast/study", data=form, files=files, timeout=120)
        assert answer.status_code == 200, answer.text
        study = answer.json()
        assert decode_npy(study["samples_npy_b64"], "s").shape == (2, 32, 32) and study["crop_spacing_mm"] == 1.5
        crop = process_study(task, trained)["crops"][0]
        direct = requests.post(
            f"{service}/geometry/v1/forecast",
            timeout=120,
            json={"crop_npy_b64": encode_npy(crop), "horizon_days": 365, "num_samples": 2, "steps": 2, "seed": 3},
        )
        assert direct.json()["case_id"] == study["case_id"]  # the very crop ingestion cut with the model's settings
        download = requests.post(
            f"{service}/geometry/v1/forecast/study?format=nifti", data=form, files=files, timeout=120
        )
        with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
            archive.extractall(tmp_path / "nifti")
        mean = read_nifti(tmp_path / "nifti" / "mean.nii.gz")
        np.testing.assert_allclose(mean.spacing[:2], [1.5, 1.5])
        np.testing.assert_allclose(
            mean.array[0], to_hu(decode_npy(study["mean_npy_b64"], "m"), (-1100.0, 500.0), "minus_one_one"), atol=1e-2
        )
    finally:
        serve.delete("geometry")


def test_old_bundle_without_preprocessing_and_a_mismatched_ingest_is_a_clear_503(service, tiny_cohort):
    """The `secure` app serves a format-2-style Forecaster (no preprocessing, 32 px) with
    the default 64 px ingest config: the fallback refuses with 503 (the service's set-up, not the request), saying why."""
    from test_serving_studies import settings, tasks_by_format

    task = tasks_by_format(tiny_cohort)["nifti"]
    path = Path(task["path"])
    answer = requests.post(
        f"{service}/secure/v1/forecast/study",
        headers={"Authorization": "Bearer s3cret"},
        data={"request": settings(task).model_dump_json()},
        files=[("study", (path.name, path.read_bytes()))],
        timeout=60,
    )
    assert answer.status_code == 503, answer.text  # a service set-up problem, not the client's
    assert "saved without its crop preprocessing" in answer.json()["error"]
