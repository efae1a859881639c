"""The CLDM routes in process (no Ray Serve), on a tiny random CLDM bundle: GET
/v1/cldm/model, POST /v1/cldm/forecast answering exactly what the bundle forecasts for
the same priors and seed (in any prior order, alone or batched), the mask, volume,
per-sample spread, anchoring and reports; every bad field a 4xx naming it, never a 5xx;
a service without a CLDM model answers 404; property-based requests (schema fuzzing: test_serving_fuzz)."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from cldm_fixtures import IMAGE, VOLUME, random_priors, write_tiny_bundle
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_fakes import CFG, FakeDeployment, replica_context  # noqa: F401

from cohortcast.models.cldm_bundle import CLDMBundle
from cohortcast.serving.cldm_model import CLDMModel, run_cldm_batch
from cohortcast.serving.cldm_requests import CLDMForecastRequest, prepare_cldm
from cohortcast.serving.local import local_app
from cohortcast.serving.requests import encode_npy

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CLDMBundle:
    return CLDMBundle.load(write_tiny_bundle(tmp_path_factory.mktemp("cldm-serve") / "train"))


@pytest.fixture
def api(bundle, replica_context) -> TestClient:  # noqa: F811
    app = local_app(FakeDeployment(), CFG, cldm=CLDMModel.from_loaded(bundle, CFG))
    # One event loop for the client's life: `@serve.batch` binds its queue to the loop of
    # its first call (in Serve, the replica's), and a bare TestClient runs each request
    # on a fresh loop.
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def body(kind="ct", k=2, seed=0, **kw) -> dict:
    priors = random_priors(kind, 1, k, seed=seed)[0]
    return {
        "kind": kind,
        "priors": [{"image_npy_b64": encode_npy(image), "days_before_target": days} for image, days in priors],
        "num_samples": 2,
        "steps": 2,
        "seed": 5,
        **kw,
    }


def decoded(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def test_model_route_describes_the_bundle_without_paths(api, bundle):
    answer = api.get("/v1/cldm/model")
    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert info["kinds"] == ["ct", "radiograph"] and info["image_shapes"]["ct"] == list(VOLUME)
    assert info["max_priors"] == bundle.max_priors and info["anchoring_kinds"] == ["ct"]
    assert info["limits"]["max_samples"] == CFG.max_samples
    assert "/" not in json.dumps({k: v for k, v in info.items() if k != "cohortcast_version"})


def test_ct_forecast_is_what_the_bundle_forecasts_in_any_prior_order(api, bundle):
    rng = np.random.default_rng(1)
    mask = (rng.uniform(size=VOLUME) > 0.7).astype(np.uint8)
    request = body(k=3, voxel_ml=0.5, last_prior_mask_npy_b64=npy(mask))
    answer = api.post("/v1/cldm/forecast", json=request)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    # The same priors, oldest first, through the bundle directly.
    priors = sorted(
        [(decoded(p["image_npy_b64"]), p["days_before_target"]) for p in request["priors"]], key=lambda p: -p[1]
    )
    direct = bundle.forecast(
        [priors], [out["case_id"]], 2, seed=5, steps=2, voxel_ml=0.5, prior_masks=[mask], kind="ct"
    )[0]
    assert np.array_equal(decoded(out["probability_npy_b64"]), direct.probability)
    assert np.array_equal(decoded(out["mask_npy_b64"]), direct.mask) and decoded(out["mask_npy_b64"]).dtype == np.uint8
    assert (
        out["fibrotic_voxels"] == direct.fibrotic_voxels and out["fibrotic_volume_ml"] == direct.fibrotic_voxels * 0.5
    )
    assert out["sample_voxels"] == direct.sample_voxels.tolist() and len(out["sample_volume_ml"]) == 2
    assert np.array_equal(decoded(out["anchored_mask_npy_b64"]), direct.anchored_mask)
    assert out["priors_used"] == 3 and out["report"] is None and out["token_variance_mean"] >= 0
    shuffled = {**request, "priors": request["priors"][::-1]}
    again = api.post("/v1/cldm/forecast", json=shuffled).json()
    assert again == out  # the order the priors came in does not matter
    other_seed = api.post("/v1/cldm/forecast", json={**request, "seed": 6}).json()
    assert other_seed["probability_npy_b64"] != out["probability_npy_b64"]


def test_radiograph_forecast_carries_a_report_and_the_regressor_answers(api):
    answer = api.post("/v1/cldm/forecast", json=body("radiograph", k=2))
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert isinstance(out["report"], str) and out["mask_npy_b64"] is None and out["kind"] == "radiograph"
    regressor = api.post("/v1/cldm/forecast", json=body("ct", method="regressor"))
    assert regressor.status_code == 200 and regressor.json()["method"] == "regressor"


def test_cldm_requests_default_to_ddim_50_not_the_namd_few_step_default(bundle):
    """The service's 5-step DPM-Solver++ default was measured on NAMD only: a CLDM request
    naming no sampler or steps gets serve.cldm_default_sampler / cldm_default_steps."""
    from cohortcast.config.serving import ServeConfig

    plain = {k: v for k, v in body("ct").items() if k != "steps"}
    cfg = ServeConfig()
    item = prepare_cldm(CLDMForecastRequest.model_validate(plain), bundle.info(), cfg)
    assert (item.sampler, item.steps) == ("ddim", 50) != (cfg.default_sampler, cfg.default_steps)
    chosen = prepare_cldm(
        CLDMForecastRequest.model_validate({**plain, "steps": 7, "sampler": "dpmsolver++"}), bundle.info(), cfg
    )
    assert (chosen.sampler, chosen.steps) == ("dpmsolver++", 7)
    capped = prepare_cldm(CLDMForecastRequest.model_validate(plain), bundle.info(), ServeConfig(max_steps=20))
    assert capped.steps == 20  # a service that lowers max_steps caps the CLDM default with it


def test_a_batch_answers_each_request_as_alone(bundle):
    requests = [body("ct", k=k, seed=s) for k, s in ((1, 0), (3, 1), (2, 2))] + [body("radiograph", seed=3)]
    info = bundle.info()
    items = [prepare_cldm(CLDMForecastRequest.model_validate(r), info, CFG) for r in requests]
    together = run_cldm_batch(bundle, items + items[:1])  # a duplicate request is answered too
    assert len(together) == 5
    for item, forecast in zip(items + items[:1], together):
        alone = run_cldm_batch(bundle, [item])[0]
        assert np.array_equal(alone.token_mean, forecast.token_mean)
        if item.kind == "ct":
            assert np.array_equal(alone.probability, forecast.probability)
        else:
            assert alone.report == forecast.report


def test_concurrent_requests_share_one_bundle_call(bundle, replica_context, monkeypatch):  # noqa: F811
    import asyncio

    calls = []
    forecast = bundle.forecast
    monkeypatch.setattr(
        bundle, "forecast", lambda priors, *a, **kw: calls.append(len(priors)) or forecast(priors, *a, **kw)
    )
    info = bundle.info()
    items = [prepare_cldm(CLDMForecastRequest.model_validate(body("ct", seed=s)), info, CFG) for s in range(3)]
    model = CLDMModel.from_loaded(bundle, replace(CFG, batch_wait_timeout_s=0.5))

    async def together():
        return await asyncio.gather(*(model.forecast(item) for item in items))

    answers = asyncio.run(together())
    assert calls == [3]  # one batch of three cases
    for item, answer in zip(items, answers):
        assert np.array_equal(answer.probability, run_cldm_batch(bundle, [item])[0].probability)


def _bad(mutate) -> dict:
    request = body()
    mutate(request)
    return request


def _set(path, value):
    def mutate(request):
        target = request
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


BAD = [
    (_set(["priors", 0, "image_npy_b64"], encode_npy(np.zeros(IMAGE, np.float32))), 400, "priors.0.image_npy_b64"),
    (_set(["priors", 1, "image_npy_b64"], encode_npy(np.full(VOLUME, 3.0, np.float32))), 400, "priors.1.image_npy_b64"),
    (_set(["priors", 0, "image_npy_b64"], "not base64!"), 400, "priors.0.image_npy_b64"),
    (_set(["priors", 0, "image_npy_b64"], npy(np.zeros(VOLUME, np.int32))), 400, "priors.0.image_npy_b64"),
    (_set(["priors", 0, "days_before_target"], 1e6), 400, "priors.0.days_before_target"),
    (_set(["priors", 0, "days_before_target"], 0), 422, "priors.0.days_before_target"),
    (_set(["priors"], []), 422, "priors"),
    (lambda r: r.update(priors=r["priors"] * 4), 400, "priors"),  # 8 > max_priors 6
    (_set(["last_prior_mask_npy_b64"], npy(np.full(VOLUME, 2, np.uint8))), 400, "last_prior_mask_npy_b64"),
    (_set(["last_prior_mask_npy_b64"], npy(np.zeros((2, 2), np.uint8))), 400, "last_prior_mask_npy_b64"),
    (_set(["num_samples"], CFG.max_samples + 1), 400, "num_samples"),
    (_set(["steps"], 0), 400, "steps"),
    (_set(["seed"], -1), 422, "seed"),
    (_set(["kind"], "mri"), 422, "kind"),
    (_set(["method"], "magic"), 422, "method"),
    (_set(["voxel_ml"], -1.0), 422, "voxel_ml"),
]


@pytest.mark.parametrize(("mutate", "status", "field"), BAD)
def test_every_bad_field_is_a_4xx_naming_it(api, mutate, status, field):
    answer = api.post("/v1/cldm/forecast", json=_bad(mutate))
    assert (answer.status_code, answer.json()["field"]) == (status, field), answer.text


def test_a_mask_for_a_kind_that_is_not_segmented_is_refused(api):
    request = body("radiograph", last_prior_mask_npy_b64=npy(np.zeros(IMAGE, np.uint8)))
    answer = api.post("/v1/cldm/forecast", json=request)
    assert (answer.status_code, answer.json()["field"]) == (400, "last_prior_mask_npy_b64")


def test_non_finite_days_in_raw_json_are_a_422(api):
    text = json.dumps(body()).replace('"days_before_target": ', '"days_before_target": NaN, "x": ', 1)
    answer = api.post("/v1/cldm/forecast", content=text.encode(), headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["field"] == "priors.0.days_before_target"


def test_a_service_without_a_cldm_model_answers_404(replica_context):  # noqa: F811
    api = TestClient(local_app(FakeDeployment(), CFG), raise_server_exceptions=False)
    for answer in (api.get("/v1/cldm/model"), api.post("/v1/cldm/forecast", json=body())):
        assert answer.status_code == 404 and "serve.cldm_model" in answer.json()["error"]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    k=st.integers(1, 4),
    seed=st.integers(0, 2**63 - 1),
    days=st.lists(st.floats(0.5, CFG.max_horizon_days), min_size=4, max_size=4),
    kind=st.sampled_from(["ct", "radiograph"]),
)
def test_any_valid_request_is_answered_and_reproducible(bundle, replica_context, k, seed, days, kind):  # noqa: F811
    request = body(kind, k=k, seed=0)
    for prior, d in zip(request["priors"], days):
        prior["days_before_target"] = d
    request["seed"] = seed
    with TestClient(local_app(FakeDeployment(), CFG, cldm=CLDMModel.from_loaded(bundle, CFG))) as api:
        first = api.post("/v1/cldm/forecast", json=request)
        assert first.status_code == 200, first.text
        assert api.post("/v1/cldm/forecast", json=request).json() == first.json()
