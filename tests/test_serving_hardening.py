"""The service's answers to hostile or broken input, in process (no Ray, no network):
non-finite and complex values are 4xx naming the field, never 500; decompression bombs
in uploads are 413 naming the limit; cohort jobs are confined to serve.cohort_roots and
answer 503/404 without a job server; a slow forecast does not stall /healthz."""

import asyncio
import base64
import io
import os
import time
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

try:  # starlette's TestClient uses httpx2 where installed, else httpx
    import httpx2 as httpx
except ImportError:
    import httpx

from serving_fakes import CFG, SIDE, FakeDeployment, FakeJobs, crop_body, fake_model, replica_context  # noqa: F401

from cohortcast.config import IngestConfig
from cohortcast.serving.local import local_app
from cohortcast.serving.requests import RequestError
from cohortcast.serving.studies import StudyForecastRequest, StudyLimits, Upload, study_crop

INGEST = IngestConfig(crop_size=SIDE, crop_spacing_mm=1.5)
SETTINGS = StudyForecastRequest(center_voxel=[1, 1, 1], horizon_days=30)


def client(deployment=None, cfg=CFG, **kw) -> TestClient:
    return TestClient(
        local_app(deployment or FakeDeployment(), cfg, ingest=INGEST, **kw), raise_server_exceptions=False
    )


def npy_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def raw_post(api: TestClient, text: str):
    return api.post("/v1/forecast", content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("horizon", ["NaN", "Infinity", "-Infinity", "1e999", "0", "-3", '"soon"'])
def test_non_finite_horizon_is_422_not_500(horizon):
    crop = crop_body()["crop_npy_b64"]
    answer = raw_post(client(), f'{{"crop_npy_b64": "{crop}", "horizon_days": {horizon}}}')
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == "horizon_days" and set(answer.json()) == {"error", "field"}  # no input echo


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((SIDE, SIDE), np.complex64),  # was accepted (200)
        np.zeros((SIDE, SIDE), np.int16),
        np.zeros((SIDE, SIDE), bool),
        np.full((SIDE, SIDE), np.nan, np.float32),
        np.full((SIDE, SIDE), np.inf, np.float64),
        np.zeros((SIDE, SIDE, 1), np.float32),
        np.zeros(SIDE * SIDE, np.float32),
        np.zeros((SIDE, SIDE), [("a", "f4"), ("b", "f4")]),
    ],
    ids=["complex", "int", "bool", "nan", "inf", "3d", "1d", "structured"],
)
def test_bad_crop_arrays_are_400_naming_the_field(array):
    answer = client().post("/v1/forecast", json=crop_body(crop_npy_b64=npy_b64(array)))
    assert answer.status_code == 400 and answer.json()["field"] == "crop_npy_b64", answer.text


def test_npy_header_claiming_a_huge_array_is_refused_before_allocating():
    header = io.BytesIO()  # magic + header claiming 8 TB of float64, then 64 bytes of data
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    text = base64.b64encode(header.getvalue() + b"\0" * 64).decode()
    started = time.perf_counter()
    answer = client().post("/v1/forecast", json=crop_body(crop_npy_b64=text))
    assert answer.status_code == 400 and "shape" in answer.json()["error"]
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    "ehr, field",
    [
        ({"age": 10**400}, "ehr.age"),  # a JSON integer too large for a float: was an OverflowError
        ({"SCT_LONG_DIA": float("nan")}, "ehr.SCT_LONG_DIA"),
        ({"age": True}, "ehr.age"),
        ({"gender": ["Male"]}, "ehr.gender"),
        ({"x" * 500: 1}, "ehr"),
    ],
)
def test_bad_ehr_values_are_400(ehr, field):
    import json

    body = json.dumps(crop_body(ehr=ehr), allow_nan=True)
    answer = raw_post(client(), body)
    assert answer.status_code == 400 and answer.json()["field"] == field, answer.text
    assert len(answer.text) < 2000  # a huge value is not echoed back whole


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"num_samples": 10**30}, "num_samples"),
        ({"steps": 0}, "steps"),
    ],
)
def test_counts_out_of_range_are_4xx(change, field):
    answer = client().post("/v1/forecast", json=crop_body(**change))
    assert answer.status_code in (400, 422) and answer.json()["field"] == field, answer.text


def test_unexpected_model_errors_are_a_bare_500_and_a_dead_model_a_503():
    from ray.exceptions import RayActorError

    broken = client(FakeDeployment(error=KeyError("/srv/secret/path")))
    answer = broken.post("/v1/forecast", json=crop_body())
    assert answer.status_code == 500 and answer.json() == {"error": "internal error", "field": None}
    gone = client(FakeDeployment(error=RayActorError())).post("/v1/forecast", json=crop_body())
    assert gone.status_code == 503 and "model" in gone.json()["error"]


def test_crop_size_mismatch_is_503_not_500():
    answer = client(FakeDeployment(side=16)).post(
        "/v1/forecast/study", data={"request": SETTINGS.model_dump_json()}, files=[("study", ("a.dcm", b"x"))]
    )
    assert answer.status_code == 503 and "misconfigured" in answer.json()["error"]


def test_study_request_with_non_finite_centre_is_422():
    answer = client().post(
        "/v1/forecast/study",
        data={"request": '{"horizon_days": 3, "center_voxel": [1, NaN, 2]}'},
        files=[("study", ("a.dcm", b"x"))],
    )
    assert answer.status_code == 422 and answer.json()["field"].startswith("request")


# --- decompression bombs --------------------------------------------------------------------


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


SMALL = StudyLimits(max_uncompressed_bytes=2**20, max_voxels=10**6, max_files=8)


def test_zip_bomb_is_refused_from_its_headers():
    bomb = zipped({"a.dcm": bytes(8 * 2**20)})  # 8 MiB of zeros: a few KiB sent
    assert len(bomb) < 64 * 2**10
    with pytest.raises(RequestError) as info:
        study_crop([Upload("s.zip", bomb)], SETTINGS, INGEST, 2**30, SMALL)
    assert info.value.status == 413 and "serve.max_uncompressed_mb" in info.value.message


def test_zip_members_count_against_one_budget_across_archives():
    half = zipped({"a.dcm": bytes(600 * 2**10)})  # each under the limit, together over it
    with pytest.raises(RequestError) as info:
        study_crop([Upload("1.zip", half), Upload("2.zip", half)], SETTINGS, INGEST, 2**30, SMALL)
    assert info.value.status == 413


def test_zip_header_that_lies_about_its_size_is_refused(tmp_path):
    data = zipped({"a.dcm": bytes(4 * 2**20)})
    # Claim 100 bytes in the central directory and the local header: extraction must not
    # write more than the claim (a CRC/size error, not a 4 MiB file).
    size = (4 * 2**20).to_bytes(4, "little")
    lying = data.replace(size, (100).to_bytes(4, "little"))
    assert lying != data
    with pytest.raises(RequestError) as info:
        study_crop([Upload("s.zip", lying)], SETTINGS, INGEST, 2**30, SMALL)
    assert info.value.status in (400, 413) and info.value.field == "study"


def test_too_many_files_is_413():
    many = zipped({f"{i}.dcm": b"x" for i in range(20)})
    with pytest.raises(RequestError) as info:
        study_crop([Upload("s.zip", many)], SETTINGS, INGEST, 2**30, SMALL)
    assert info.value.status == 413 and "serve.max_study_files" in info.value.message


def test_zip_bomb_over_http_is_413_naming_the_limit():
    cfg = replace(CFG, max_uncompressed_mb=1.0)
    answer = client(cfg=cfg).post(
        "/v1/forecast/study",
        data={"request": SETTINGS.model_dump_json()},
        files=[("study", ("s.zip", zipped({"a.dcm": bytes(8 * 2**20)})))],
    )
    assert answer.status_code == 413 and "serve.max_uncompressed_mb" in answer.json()["error"]


def test_reader_gets_the_service_limits_and_too_large_is_413(monkeypatch):
    from cohortcast.data import readers
    from cohortcast.data.errors import TooLargeError

    seen = {}

    def too_large(path, modality="CT", limits=None):
        seen["limits"] = limits
        raise TooLargeError(path, "1073741824 voxels exceed the limit")

    monkeypatch.setattr(readers, "read_study", too_large)
    cfg = replace(CFG, max_voxels=1000, max_uncompressed_mb=3.0)
    answer = client(cfg=cfg).post(
        "/v1/forecast/study",
        data={"request": SETTINGS.model_dump_json()},
        files=[("study", ("x.nii.gz", b"\x1f\x8bbomb"))],
    )
    assert answer.status_code == 413 and "serve.max_voxels" in answer.json()["error"]
    assert "cohortcast-upload" not in answer.text and "/tmp" not in answer.text
    assert seen["limits"].max_voxels == 1000 and seen["limits"].max_uncompressed_bytes == 3 * 2**20


def test_nifti_with_too_many_voxels_is_413(tiny_cohort):
    """End to end through the real reader (needs the data readers' ReadLimits enforcement)."""
    from test_serving_studies import tasks_by_format

    task = tasks_by_format(tiny_cohort)["nifti"]
    with open(task["path"], "rb") as handle:
        data = handle.read()
    cfg = replace(CFG, max_voxels=100)
    answer = client(cfg=cfg).post(
        "/v1/forecast/study",
        data={"request": SETTINGS.model_dump_json()},
        files=[("study", (os.path.basename(task["path"]), data))],
    )
    if answer.status_code != 413:
        pytest.skip("the data readers do not enforce ReadLimits.max_voxels in this tree yet")
    assert "serve.max_voxels" in answer.json()["error"]


# --- cohort jobs -----------------------------------------------------------------------------


@pytest.fixture
def cohorts(tmp_path):
    root, outside = tmp_path / "allowed", tmp_path / "private"
    (root / "cohort").mkdir(parents=True)
    (root / "cohort" / "card.json").write_text("{}")
    (outside / "cohort").mkdir(parents=True)
    (outside / "cohort" / "card.json").write_text("{}")
    (root / "escape").symlink_to(outside / "cohort")
    jobs = FakeJobs()
    api = client(cfg=replace(CFG, cohort_roots=[str(root)], cohort_output=str(tmp_path / "out")))
    api.app.state.api._jobs = jobs
    return api, jobs, root, outside


def test_cohort_submission_is_disabled_without_roots():
    answer = client().post("/v1/cohorts", json={"ingested": "/etc"})
    assert answer.status_code == 403 and "serve.cohort_roots" in answer.json()["error"]


def test_cohorts_are_confined_to_the_roots(cohorts):
    api, jobs, root, outside = cohorts
    for ingested in (
        str(outside / "cohort"),
        str(root / ".." / "private" / "cohort"),
        "../private/cohort",
        str(root / "escape"),
        "escape",
        "/",
    ):
        answer = api.post("/v1/cohorts", json={"ingested": ingested})
        assert answer.status_code == 403, (ingested, answer.text)
        assert str(outside) not in answer.text.replace(ingested, "")  # only what the client sent comes back
    assert api.post("/v1/cohorts", json={"ingested": "."}).status_code == 400  # inside, but no card.json
    assert api.post("/v1/cohorts", json={"ingested": "a\x00b"}).status_code == 400
    assert not jobs.submitted


def test_cohort_job_submitted_and_reported_without_server_paths(cohorts):
    api, jobs, root, _ = cohorts
    answer = api.post("/v1/cohorts", json={"ingested": "cohort", "num_samples": 1})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert str(root) not in answer.text and answer.json()["output"] == job_id
    assert str((root / "cohort").resolve()) in jobs.submitted[0][1]  # the job gets the resolved folder
    jobs.status, jobs.message = (
        "FAILED",
        "Job entrypoint command failed with exit code 1, last available logs "
        "(truncated to 20,000 chars):\nTraceback ... /srv/data/patient.dcm",
    )
    status = api.get(f"/v1/cohorts/{job_id}").json()
    assert status["status"] == "FAILED" and status["message"] == "Job entrypoint command failed with exit code 1"
    assert "/srv" not in str(status) and str(root) not in str(status)


def test_unknown_cohort_jobs_are_404_and_never_reach_the_job_api(cohorts):
    api, jobs, _, _ = cohorts
    assert api.get("/v1/cohorts/cohort-0123456789ab").status_code == 404  # asked, unknown
    for job_id in ("raysubmit_abc", "cohort-nope", "cohort-0123456789abc", "..%2Fversion"):
        assert api.get(f"/v1/cohorts/{job_id}").status_code == 404
    assert jobs.asked == ["cohort-0123456789ab"]


def test_missing_job_server_is_503(cohorts, tmp_path):
    from conftest import free_port

    api, jobs, _, _ = cohorts
    jobs.fail = ConnectionError("refused")
    assert api.post("/v1/cohorts", json={"ingested": "cohort"}).status_code == 503
    # A real client against a port where nothing listens (a Ray without its dashboard).
    cfg = replace(CFG, cohort_roots=[str(tmp_path)], jobs_address=f"http://127.0.0.1:{free_port()}")
    real = client(cfg=cfg)
    for answer in (
        real.get("/v1/cohorts/cohort-0123456789ab"),
        real.post("/v1/cohorts", json={"ingested": "allowed/cohort"}),
    ):
        assert answer.status_code == 503 and "job server" in answer.json()["error"], answer.text


# --- the event loop ---------------------------------------------------------------------------


def test_healthz_answers_while_a_slow_forecast_runs(replica_context):
    import threading

    model = fake_model(delay=2.0)
    app = local_app(model, CFG, ingest=INGEST)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            slow = asyncio.create_task(http.post("/v1/forecast", json=crop_body()))
            await asyncio.sleep(0.4)  # the batch is computing now
            started = time.perf_counter()
            health = await http.get("/healthz")
            waited = time.perf_counter() - started
            model.check_health()  # Serve's health check on the model replica: also prompt
            checked = time.perf_counter() - started
            running = not slow.done()
            return health, waited, checked, running, await slow

    health, waited, checked, running, answer = asyncio.run(scenario())
    assert health.status_code == 200 and running and waited < 1.0 and checked < 1.0
    assert answer.status_code == 200 and answer.json()["num_samples"] == 2
    assert model.model.threads and threading.get_ident() not in model.model.threads  # DDIM ran off the loop


def test_reconfigure_changes_limits_and_refuses_bad_ones(replica_context):
    api = client().app.state.api
    api.reconfigure({"max_samples": 2, "default_samples": 1})
    assert api.cfg.max_samples == 2
    with pytest.raises(ValueError):
        api.reconfigure({"auth_token_env": "X"})  # not a live setting
    with pytest.raises(ValueError):
        api.reconfigure({"default_samples": 5})  # above max_samples: refused, old limits kept
    assert api.cfg.default_samples == 1
    model = fake_model()
    model.reconfigure({"max_batch_size": 2, "micro_batch": 3})
    assert model.model.cfg.scheduler.micro_batch == 3
