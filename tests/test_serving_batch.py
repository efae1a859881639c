"""Request validation and the batching logic of the forecasting service, without Serve:
a request's answer is bit-identical alone or batched with others."""

import numpy as np
import pytest
import torch

from conftest import forecaster_config

from cohortcast.config.models import ConditionerConfig, SchedulerConfig
from cohortcast.config.serving import ServeConfig
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.tiny_llm import write_tiny_gemma3
from cohortcast.serving.forecast_model import run_batch
from cohortcast.serving.requests import ForecastRequest, RequestError, decode_npy, encode_npy, prepare

CFG = ServeConfig(default_samples=2, max_samples=4, default_steps=3, max_steps=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-model")
    llm = write_tiny_gemma3(root / "llm", ["solid nodule right upper lobe long axis mm"])
    torch.manual_seed(0)
    return Forecaster(
        forecaster_config(
            conditioner=ConditionerConfig(llm_path=str(llm), num_soft_prompts=2, max_length=64),
            scheduler=SchedulerConfig(micro_batch=4),
        )
    ).eval()


def request(seed=0, value=0.1, **kw):
    crop = np.full((32, 32), value, np.float32)
    crop[12:20, 12:20] = 0.8
    return ForecastRequest(
        crop_npy_b64=encode_npy(crop),
        horizon_days=365,
        seed=seed,
        ehr={"age": 61, "SCT_LONG_DIA": 8.0, "gender": "Female"},
        **kw,
    )


def test_answers_do_not_depend_on_the_batch(model):
    a, b, c = (prepare(r, (32, 32), CFG, True) for r in (request(), request(value=-0.2), request(seed=3)))
    alone = run_batch(model, [a])[0]
    batched = run_batch(model, [b, a, c, a])  # other requests, another seed, and a duplicate
    for key in ("mean", "variance", "samples"):
        np.testing.assert_array_equal(alone[key], batched[1][key])
        np.testing.assert_array_equal(batched[1][key], batched[3][key])
    assert not np.array_equal(batched[1]["mean"], batched[2]["mean"])  # another seed, another forecast
    # ...computed in the same call as seed 0, yet equal to itself alone.
    np.testing.assert_array_equal(run_batch(model, [c])[0]["samples"], batched[2]["samples"])
    assert alone["samples"].shape == (2, 32, 32)


def test_a_request_names_its_sampler_and_batches_only_with_its_own(model):
    """`sampler` picks DDIM or DPM-Solver++ (the service's default_sampler when unset);
    a batch mixing both answers each as if it were alone."""
    ddim, dpm = prepare(request(sampler="ddim"), (32, 32), CFG, True), prepare(request(), (32, 32), CFG, True)
    assert (ddim.sampler, dpm.sampler) == ("ddim", "dpmsolver++") and ddim.case_id == dpm.case_id  # the default
    assert prepare(request(), (32, 32), ServeConfig(default_sampler="ddim"), True).sampler == "ddim"
    assert prepare(request(steps=None), (32, 32), ServeConfig(), True).steps == 5  # the measured few-step default
    mixed = run_batch(model, [dpm, ddim])
    np.testing.assert_array_equal(mixed[0]["samples"], run_batch(model, [dpm])[0]["samples"])
    np.testing.assert_array_equal(mixed[1]["samples"], run_batch(model, [ddim])[0]["samples"])
    assert not np.array_equal(mixed[0]["samples"], mixed[1]["samples"])  # another solver, another path


def test_prepared_request_carries_the_validated_record():
    """PreparedRequest.ehr (a dict, for models with an EHR encoder) replaced ehr_text;
    equal records give equal case ids (they seed the samples)."""
    with_ehr, without = prepare(request(), (32, 32), CFG, True), prepare(request(), (32, 32), CFG, False)
    assert with_ehr.ehr["SCT_LONG_DIA"] == 8.0 and with_ehr.ehr["gender"] == "Female" and without.ehr is None
    assert prepare(request(), (32, 32), CFG, True).case_id == with_ehr.case_id != without.case_id


@pytest.mark.parametrize(
    "change, field",
    [
        ({"crop_npy_b64": encode_npy(np.zeros((16, 16)))}, "crop_npy_b64"),
        ({"crop_npy_b64": "not base64!"}, "crop_npy_b64"),
        ({"crop_npy_b64": encode_npy(np.full((32, 32), 5.0))}, "crop_npy_b64"),
        ({"num_samples": 9}, "num_samples"),
        ({"steps": 0}, "steps"),
        ({"sampler": "euler"}, "sampler"),
        ({"horizon_days": 99999}, "horizon_days"),
        ({"ehr": {"age": 300}}, "ehr.age"),
        ({"ehr": {"gender": "X"}}, "ehr.gender"),
        ({"ehr": {"shoe_size": 42}}, "ehr.shoe_size"),
    ],
)
def test_bad_requests_name_the_field(change, field):
    body = request().model_dump() | change
    with pytest.raises(RequestError) as info:  # model_construct: the service's own checks, not pydantic's
        prepare(ForecastRequest.model_construct(**body), (32, 32), CFG, True)
    assert info.value.field == field


def test_npy_round_trip():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(decode_npy(encode_npy(array), "x"), array)


def test_serve_config_file_builds_the_application(monkeypatch):
    import importlib

    import yaml
    from ray.serve import Application

    spec = yaml.safe_load(open("cluster/serve_config.yaml"))["applications"][0]
    module, name = spec["import_path"].split(":")
    app = getattr(importlib.import_module(module), name)(spec["args"])
    assert isinstance(app, Application)
    from cohortcast.serving.entry import app_builder

    with pytest.raises(ValueError, match="COHORTCAST_TEST_TOKEN"):
        app_builder({"config": spec["args"]["config"], "set": ["serve.auth_token_env=COHORTCAST_TEST_TOKEN"]})
    monkeypatch.setenv("COHORTCAST_TEST_TOKEN", "x")
    assert isinstance(app_builder({"set": ["serve.auth_token_env=COHORTCAST_TEST_TOKEN"]}), Application)


def test_app_dashboard_plots_the_metrics_the_service_emits():
    import json
    import re

    from cohortcast.serving.forecast_model import ServiceMetrics

    emitted = {metric.info["name"] for metric in vars(ServiceMetrics()).values()}  # the metrics it creates
    dashboard = json.load(open("dashboards/cohortcast_serving.json"))
    plotted = {
        m
        for p in dashboard["panels"]
        for t in p["targets"]
        for m in re.findall(r"ray_(cohortcast_\w+?)(?:_total|_bucket)?\b", t["expr"])
    }
    assert emitted and plotted == emitted
    for name in ("serve_grafana_dashboard", "default_grafana_dashboard"):
        assert json.load(open(f"dashboards/ray/{name}.json"))["panels"]
