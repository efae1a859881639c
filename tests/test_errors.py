"""One error model (cohortcast.errors): every error class of the package derives from
CohortcastError; the CLI and jobs turn one into `error: <message>` and exit status 2,
the API into its status and {"error", "field"}."""

import ast
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving_fakes import CFG, FakeDeployment, FakeJobs, crop_body

import cohortcast
from cohortcast.cli import main
from cohortcast.errors import CohortcastError, MissingInputError, OutputExistsError
from cohortcast.serving.local import local_app

# Exception classes that never reach a user (caught inside the package), with the reason.
# Empty today; a class added here needs its reason in a comment.
INTERNAL_ERRORS: set[str] = set()


class BrokenPromise(CohortcastError):
    """A stand-in for any user error, with a status of its own."""

    http_status = 409


def package_error_classes() -> dict[str, type]:
    """Every exception class defined in a module of the package, by qualified name.
    (Imports them all: a new module's error class cannot hide.)"""
    found = {}
    for module in pkgutil.walk_packages(cohortcast.__path__, "cohortcast."):
        if module.name.endswith("__main__"):  # runs the CLI when imported
            continue
        loaded = importlib.import_module(module.name)
        for name, obj in vars(loaded).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == loaded.__name__:
                found[f"{module.name}.{name}"] = obj
    return found


def test_every_error_class_of_the_package_is_a_cohortcast_error():
    classes = package_error_classes()
    # The walk reaches the sub-packages (a broken walk would pass vacuously).
    for name in (
        "cohortcast.config.loader.ConfigError",
        "cohortcast.data.manifest.ManifestError",
        "cohortcast.serving.requests.RequestError",
        "cohortcast.data.errors.StudyError",
    ):
        assert name in classes
    strays = sorted(
        name for name, cls in classes.items() if not issubclass(cls, CohortcastError) and name not in INTERNAL_ERRORS
    )
    assert not strays, f"error classes without the CohortcastError base: {strays}"
    for name, cls in classes.items():
        if issubclass(cls, CohortcastError):
            assert 400 <= cls.http_status <= 599, name


def test_error_classes_keep_the_builtin_bases_callers_catch():
    from cohortcast.config import ConfigError
    from cohortcast.data.manifest import ManifestError
    from cohortcast.training.stage_runner import StageNotAvailable

    assert issubclass(ConfigError, ValueError) and issubclass(ManifestError, ValueError)
    assert issubclass(StageNotAvailable, RuntimeError)
    assert issubclass(MissingInputError, FileNotFoundError) and MissingInputError.http_status == 404
    assert issubclass(OutputExistsError, FileExistsError) and OutputExistsError.http_status == 409


def test_errors_module_imports_nothing_from_cohortcast():
    """Every package imports it; an import of ours there would be a cycle."""
    tree = ast.parse(Path(cohortcast.__file__).with_name("errors.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "cohortcast"], imported


def stderr_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_reports_a_cohortcast_error_as_exit_2_and_its_message(monkeypatch, capsys):
    def failing(args):
        raise BrokenPromise("forecast.output holds cases with other settings")

    monkeypatch.setattr("cohortcast.cli.cmd_config", failing)
    assert main(["config"]) == 2
    assert stderr_line(capsys.readouterr().err) == "error: forecast.output holds cases with other settings"


def test_cli_does_not_swallow_bugs(monkeypatch):
    """Only user errors become exit 2; anything else keeps its traceback."""

    def buggy(args):
        raise KeyError("bug")

    monkeypatch.setattr("cohortcast.cli.cmd_config", buggy)
    with pytest.raises(KeyError):
        main(["config"])


def test_jobs_report_a_cohortcast_error_as_exit_2_and_its_message(monkeypatch, capsys, tmp_path):
    from cohortcast.job_entry import run_job

    config = tmp_path / "job.yaml"
    config.write_text("synth:\n  patients: 1\n")
    monkeypatch.setattr(sys, "argv", ["train_namd.py", "--config", str(config)])

    def job(cfg):
        raise BrokenPromise("stage 'vae' is not trained")

    assert run_job("a job", job, str, "a.b=c") == 2
    assert stderr_line(capsys.readouterr().err) == "error: stage 'vae' is not trained"


def test_missing_and_existing_paths_still_exit_2(monkeypatch, capsys):
    """The OS's own FileNotFoundError (a path the user named) stays a one-line error."""

    def missing(args):
        open("/nonexistent/cohortcast/file")

    monkeypatch.setattr("cohortcast.cli.cmd_config", missing)
    assert main(["config"]) == 2
    assert "/nonexistent/cohortcast/file" in stderr_line(capsys.readouterr().err)


def api(token=None) -> TestClient:
    app = local_app(FakeDeployment(), CFG, token=token)
    app.state.api._jobs = FakeJobs()
    return TestClient(app, raise_server_exceptions=False)


def test_api_answers_a_cohortcast_error_with_its_status_and_message(monkeypatch):
    def failing(*args):
        raise BrokenPromise("that cohort is being forecast already")

    monkeypatch.setattr("cohortcast.serving.app.cohort_status", failing)
    answer = api().get("/v1/cohorts/cohort-0123456789ab")
    assert answer.status_code == 409
    assert answer.json() == {"error": "that cohort is being forecast already", "field": None}


def test_api_hides_a_cohortcast_error_from_another_process():
    """A model replica's error arrives wrapped by Ray with the remote traceback in its
    text: a bare 500, never that text."""
    from ray.exceptions import RayTaskError

    from cohortcast.models.errors import ForecasterLoadError

    cause = ForecasterLoadError("/srv/models/secret: weights do not fit the config")
    wrapped = RayTaskError("forecast", "Traceback ... /srv/models/secret", cause).as_instanceof_cause()
    assert isinstance(wrapped, CohortcastError)  # what makes the guard necessary
    answer = TestClient(local_app(FakeDeployment(error=wrapped), CFG), raise_server_exceptions=False).post(
        "/v1/forecast", json=crop_body()
    )
    assert answer.status_code == 500 and answer.json() == {"error": "internal error", "field": None}


def test_every_route_but_health_and_docs_needs_the_token():
    """The auth dependency is on every route: each refuses a missing or wrong token (401,
    before looking at the body) and serves the right one."""
    client = api(token="s3cret")
    paths = client.get("/openapi.json").json()["paths"]
    assert client.get("/healthz").status_code == 200 and client.get("/docs").status_code == 200
    checked = 0
    for path, operations in paths.items():
        if path == "/healthz":
            continue
        url = path.replace("{job_id}", "cohort-0123456789ab")
        for method in operations:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                answer = client.request(method, url, headers=headers)
                assert answer.status_code == 401, (method, path, headers, answer.text)
                assert answer.json() == {"error": "missing or wrong bearer token", "field": "Authorization"}
            checked += 1
    assert (
        checked == 7
    )  # /v1/model, /v1/forecast, /v1/forecast/study, /v1/cohorts (2), /v1/cldm/model, /v1/cldm/forecast
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/model", headers=good).status_code == 200
    assert client.post("/v1/forecast", json=crop_body(), headers=good).status_code == 200
    assert client.post("/v1/forecast", json=crop_body()).status_code == 401


def test_no_token_configured_means_no_check():
    assert api().get("/v1/model", headers={"Authorization": "Bearer anything"}).status_code == 200
