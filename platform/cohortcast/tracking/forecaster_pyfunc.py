"""The trained Forecaster as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri)`
then `.predict(frame, params={...})`. The Forecaster folder travels as an artifact (with
its crop preprocessing, also in the model's metadata); the frozen LLM does not (it is
large and licensed separately): set COHORTCAST_LLM_PATH where it lives on the serving
machine if not at the path it was trained with.

Input frame: `case_id` (pseudonym), `baseline` (crop, nested lists H x W, ingestion
intensity range, cut as metadata["preprocessing"] says), `horizon_days`, optional `ehr`
(a JSON object string of NAMD EHR features by manifest name).
Params (in the signature, so MLflow passes them on): num_samples, seed, steps.
Output frame: `case_id`, `mean`, `variance` (nested lists H x W), `samples` (N x H x W).

The model carries the cohortcast code (code_paths) and pins only public releases of
what that code imports, so `mlflow models serve` / `mlflow.pyfunc.load_model` in a
fresh environment can install it (cohortcast itself is not on a package index)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np

ARTIFACT = "forecaster"
DEFAULT_SAMPLES, DEFAULT_SEED = 4, 0
# Distributions the Forecaster and this wrapper import (directly) at load and predict
# time; tests/test_forecaster_pyfunc.py checks the list against the code's imports.
MODEL_REQUIREMENTS = ("mlflow", "torch", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pyyaml")


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from cohortcast.models.forecaster import Forecaster

        self.forecaster = Forecaster.load(context.artifacts[ARTIFACT], llm_path=os.environ.get("COHORTCAST_LLM_PATH"))

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        params = params or {}
        baseline = torch.from_numpy(np.stack([_crop(b) for b in model_input["baseline"]]))[:, None]
        side = self.forecaster.cfg.vae.sample_size
        if tuple(baseline.shape[-2:]) != (side, side):
            raise ValueError(
                f"`baseline` crops are {tuple(baseline.shape[-2:])}; this Forecaster takes {side} x "
                f"{side} crops cut as its metadata's preprocessing says"
            )
        if "ehr_text" in model_input.columns:
            raise ValueError(
                "the `ehr_text` column is no longer read: pass `ehr`, a JSON object of NAMD EHR "
                "features by manifest name, per row"
            )
        records = None
        if "ehr" in model_input.columns and self.forecaster.conditioner is not None:
            records = [_record(r) for r in model_input["ehr"]]
        steps = params.get("steps")
        forecast = self.forecaster.forecast(
            baseline,
            torch.tensor(np.asarray(model_input["horizon_days"], np.float64), dtype=torch.float32),
            [str(c) for c in model_input["case_id"]],
            ehr=records,
            num_samples=int(params.get("num_samples", DEFAULT_SAMPLES)),
            seed=int(params.get("seed", DEFAULT_SEED)),
            steps=int(steps) if steps else None,
        )
        return pd.DataFrame(
            {
                "case_id": [str(c) for c in model_input["case_id"]],
                "mean": [m[0].tolist() for m in forecast.mean],
                "variance": [v[0].tolist() for v in forecast.variance],
                "samples": [s[:, 0].tolist() for s in forecast.samples],
            }
        )


def _crop(value) -> np.ndarray:
    """One `baseline` cell (nested lists, or the arrays of arrays schema enforcement gives)."""
    if isinstance(value, list) or (isinstance(value, np.ndarray) and value.dtype == object):
        return np.stack([np.asarray(row, np.float32) for row in value])
    return np.asarray(value, np.float32)


def _record(value) -> dict:
    """One `ehr` cell -> an EHR record: a JSON object string or a mapping; missing = {}."""
    if value is None or (isinstance(value, float) and value != value):
        return {}
    record = json.loads(value) if isinstance(value, str) else value
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise ValueError(f"`ehr` must hold JSON objects of EHR features, got {type(record).__name__}")
    return dict(record)


# ----- what is logged with the model -------------------------------------------------
def signature(inference_steps: int):
    """Input/output schema and the params MLflow hands to predict (without a params schema
    it drops them with 'Ignoring provided params'). `steps` defaults to the Forecaster's
    own scheduler.inference_steps."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    # double: JSON and Python floats are 64-bit, and MLflow refuses to narrow them
    image, images = Array(Array(DataType.double)), Array(Array(Array(DataType.double)))
    inputs = Schema(
        [
            ColSpec(DataType.string, "case_id"),
            ColSpec(image, "baseline"),
            ColSpec(DataType.double, "horizon_days"),
            ColSpec(DataType.string, "ehr", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec(DataType.string, "case_id"),
            ColSpec(image, "mean"),
            ColSpec(image, "variance"),
            ColSpec(images, "samples"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("num_samples", DataType.long, DEFAULT_SAMPLES),
            ParamSpec("seed", DataType.long, DEFAULT_SEED),
            ParamSpec("steps", DataType.long, int(inference_steps)),
        ]
    )
    return ModelSignature(inputs, outputs, params)


def input_example(side: int):
    """One blank crop; the params keep MLflow's check that the example can be served
    (it loads the model and predicts on it while logging) to one sample of one step."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "case_id": ["sub-example/n1"],
            "baseline": [np.zeros((side, side), np.float32).tolist()],
            "horizon_days": [365.0],
            "ehr": [json.dumps({"SCT_LONG_DIA": 8.0})],
        }
    )
    return frame, {"num_samples": 1, "seed": 0, "steps": 1}


def public_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': local version labels are on no public index."""
    return version.split("+", 1)[0]


def pip_requirements() -> list[str]:
    """MODEL_REQUIREMENTS pinned to the installed public releases."""
    from importlib.metadata import version

    return [f"{name}=={public_version(version(name))}" for name in MODEL_REQUIREMENTS]


def _package_copy(tmp: Path) -> str:
    """The cohortcast package without bytecode caches, for code_paths."""
    import cohortcast

    target = tmp / "cohortcast"
    shutil.copytree(Path(cohortcast.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def log_forecaster(folder: str, registry_name: str | None = None, alias: str | None = None):
    """Log (and optionally register) the Forecaster folder as a pyfunc model in the
    active run; `alias` (e.g. "champion", what cluster/rayservice-forecast.yaml serves)
    then points at the new registered version."""
    from cohortcast.models.forecaster import read_preprocessing

    if alias and not registry_name:
        raise ValueError("an alias needs a registered model: set mlflow.registry_name")
    cfg = _saved_config(folder)
    preprocessing = read_preprocessing(folder)
    with tempfile.TemporaryDirectory(prefix="cohortcast-code-") as tmp:
        info = mlflow.pyfunc.log_model(
            name="forecaster",
            python_model=ForecasterPyfunc(),
            artifacts={ARTIFACT: folder},
            registered_model_name=registry_name,
            code_paths=[_package_copy(Path(tmp))],
            signature=signature(cfg.scheduler.inference_steps),
            input_example=input_example(cfg.vae.sample_size),
            pip_requirements=pip_requirements(),
            metadata={"preprocessing": preprocessing.to_dict() if preprocessing else None},
        )
    if alias:
        set_alias(registry_name, info.registered_model_version, alias)
    return info


def _saved_config(folder: str):
    """The ForecasterConfig saved in the folder (no weights loaded)."""
    from cohortcast.config import from_dict
    from cohortcast.config.models import ForecasterConfig
    from cohortcast.models.forecaster import CONFIG_FILE

    return from_dict(ForecasterConfig, json.loads((Path(folder) / CONFIG_FILE).read_text())["config"])


def set_alias(registry_name: str, version, alias: str = "champion", tracking_uri: str | None = None) -> None:
    """Point `models:/<registry_name>@<alias>` at `version` (moves it from any other)."""
    from mlflow.tracking import MlflowClient

    if version is None:
        raise ValueError(f"{registry_name}: no registered version to alias as {alias!r}")
    MlflowClient(tracking_uri).set_registered_model_alias(registry_name, alias, str(version))
