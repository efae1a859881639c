"""Issue 13: the Forecaster's MLflow pyfunc model. Its signature carries a params schema,
so predict's params reach the Forecaster (seed, num_samples, steps change the answer);
its requirements are installable public releases covering what the code imports, the
cohortcast code travels with it; its metadata carries the crop preprocessing; the
registered version gets the alias asked for (what the RayService serves: @champion)."""

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import forecaster_config

import cohortcast
from cohortcast.config.models import SchedulerConfig
from cohortcast.models.forecaster import Forecaster
from cohortcast.models.preprocessing import CropPreprocessing
from cohortcast.tracking.forecaster_pyfunc import MODEL_REQUIREMENTS, log_forecaster, pip_requirements, set_alias

PREPROCESSING = CropPreprocessing(32, 1.5, (-1000.0, 400.0), "minus_one_one")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny Forecaster logged, registered as version 1 and aliased `champion`."""
    import mlflow

    before = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    Forecaster(
        forecaster_config(scheduler=SchedulerConfig(micro_batch=4, inference_steps=3)), preprocessing=PREPROCESSING
    ).save(root / "model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pyfunc-test")
    with mlflow.start_run():
        info = log_forecaster(str(root / "model"), registry_name="namd-pyfunc-test", alias="champion")
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/namd-pyfunc-test@champion", dst_path=str(root / "download")
        )
    )
    yield {"uri": uri, "info": info, "local": local, "model": mlflow.pyfunc.load_model(str(local))}
    mlflow.set_tracking_uri(before)


def frame(rows: int = 2) -> pd.DataFrame:
    crops = [np.full((32, 32), -0.5 + 0.3 * i, np.float32).tolist() for i in range(rows)]
    return pd.DataFrame(
        {
            "case_id": [f"sub-{i}/n1" for i in range(rows)],
            "baseline": crops,
            "horizon_days": [365.0] * rows,
            "ehr": [json.dumps({"SCT_LONG_DIA": 8.0})] * rows,
        }
    )


def samples(model, **params) -> np.ndarray:
    out = model.predict(frame(), params=params)
    assert list(out.columns) == ["case_id", "mean", "variance", "samples"]
    return np.stack([np.asarray([np.asarray(s, np.float32) for s in row]) for row in out["samples"]])


def test_params_reach_the_forecaster(logged, caplog):
    import logging

    logging.getLogger("mlflow").addHandler(caplog.handler)  # MLflow's loggers do not propagate
    model = logged["model"]
    params = model.metadata.get_params_schema()
    assert {p.name: p.default for p in params.params} == {"num_samples": 4, "seed": 0, "steps": 3}
    first = samples(model, num_samples=2, seed=1, steps=2)
    assert first.shape == (2, 2, 32, 32)
    np.testing.assert_array_equal(first, samples(model, num_samples=2, seed=1, steps=2))  # same seed
    assert not np.allclose(first, samples(model, num_samples=2, seed=2, steps=2))  # another seed
    assert samples(model, num_samples=3, seed=1, steps=2).shape == (2, 3, 32, 32)
    assert not np.allclose(first, samples(model, num_samples=2, seed=1, steps=1))  # steps count
    logging.getLogger("mlflow").removeHandler(caplog.handler)
    assert "Ignoring provided params" not in caplog.text


def test_requirements_are_public_pins_and_the_code_travels(logged):
    lines = [line for line in (logged["local"] / "requirements.txt").read_text().splitlines() if line.strip()]
    requirements = [Requirement(line) for line in lines]  # every line parses
    for requirement in requirements:
        [spec] = requirement.specifier
        assert spec.operator == "==" and Version(spec.version).local is None, requirement  # no "+cpu", no dev build
    assert "cohortcast" not in {r.name for r in requirements}  # on no index: shipped as code instead
    assert {r.name for r in requirements} >= set(MODEL_REQUIREMENTS)
    assert (logged["local"] / "code" / "cohortcast" / "models" / "forecaster.py").is_file()
    assert not list((logged["local"] / "code").rglob("__pycache__"))
    assert logged["model"].metadata.metadata["preprocessing"] == PREPROCESSING.to_dict()
    assert all("+" not in r for r in pip_requirements())


def test_requirements_cover_what_the_model_code_imports():
    """Every third-party module the pyfunc's code imports (at load or in a function) is
    installed by one of MODEL_REQUIREMENTS: a new import must be added there."""
    listing = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cohortcast.tracking.forecaster_pyfunc, cohortcast.models.forecaster; "
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] == 'cohortcast' and getattr(m, '__file__', None)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(cohortcast.__file__).parents[1])},
    ).stdout.split()
    distributions = packages_distributions()
    wanted = {name.lower() for name in MODEL_REQUIREMENTS}
    missing = set()
    for path in listing:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for top in {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"cohortcast", "__future__"}:
                if not {d.lower() for d in distributions.get(top, [top])} & wanted:
                    missing.add(f"{top} ({Path(path).name})")
    assert len(listing) > 10 and not missing, missing


def test_alias_points_at_the_registered_version(logged):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(logged["uri"])
    assert logged["info"].registered_model_version == 1
    assert str(client.get_model_version_by_alias("namd-pyfunc-test", "champion").version) == "1"
    set_alias("namd-pyfunc-test", 1, "staging", tracking_uri=logged["uri"])
    assert str(client.get_model_version_by_alias("namd-pyfunc-test", "staging").version) == "1"
    with pytest.raises(ValueError, match="registry_name"):
        log_forecaster(str(logged["local"]), registry_name=None, alias="champion")
