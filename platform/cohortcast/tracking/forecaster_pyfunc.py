"""The trained Forecaster as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri)`
then `.predict(frame)`. The Forecaster folder travels as an artifact; the frozen LLM
does not (it is large and licensed separately): set COHORTCAST_LLM_PATH where it lives
on the serving machine if not at the path it was trained with.

Input frame: `case_id` (pseudonym), `baseline` (crop, nested lists H x W, ingestion
intensity range), `horizon_days`, optional `ehr` (a JSON object of NAMD EHR
features by manifest name). Params: num_samples, seed, steps.
Output frame: `case_id`, `mean`, `variance` (nested lists H x W)."""

from __future__ import annotations

import json
import os

import mlflow.pyfunc
import numpy as np

ARTIFACT = "forecaster"


class ForecasterPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from cohortcast.models.forecaster import Forecaster

        self.forecaster = Forecaster.load(context.artifacts[ARTIFACT], llm_path=os.environ.get("COHORTCAST_LLM_PATH"))

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        params = params or {}
        baseline = torch.from_numpy(np.stack([np.asarray(b, np.float32) for b in model_input["baseline"]]))[:, None]
        if "ehr_text" in model_input.columns:
            raise ValueError("the `ehr_text` column is no longer read: pass `ehr`, a JSON object of NAMD EHR "
                             "features by manifest name, per row")
        records = None
        if "ehr" in model_input.columns and self.forecaster.conditioner is not None:
            records = [_record(r) for r in model_input["ehr"]]
        forecast = self.forecaster.forecast(
            baseline, torch.tensor(model_input["horizon_days"].to_numpy(), dtype=torch.float32),
            [str(c) for c in model_input["case_id"]], ehr=records,
            num_samples=int(params.get("num_samples", 4)), seed=int(params.get("seed", 0)),
            steps=int(params["steps"]) if "steps" in params else None)
        return pd.DataFrame({"case_id": list(model_input["case_id"]),
                             "mean": [m[0].tolist() for m in forecast.mean],
                             "variance": [v[0].tolist() for v in forecast.variance]})


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


def log_forecaster(folder: str, registry_name: str | None = None):
    """Log (and optionally register) the Forecaster folder as a pyfunc model in the active run."""
    from cohortcast import __version__

    return mlflow.pyfunc.log_model(
        name="forecaster", python_model=ForecasterPyfunc(), artifacts={ARTIFACT: folder},
        registered_model_name=registry_name,
        # The package and its pinned stack are installed where this is served; listing
        # them avoids MLflow's slow requirement inference from the environment.
        pip_requirements=[f"cohortcast=={__version__}"])
