"""Where the served Forecaster comes from: a local Forecaster folder, or an MLflow model
URI (`models:/namd-forecaster/3`, `models:/namd-forecaster@champion`, `runs:/<id>/forecaster`,
or any artifact URI of a logged model) that the training job logged (tracking.forecaster_pyfunc).
Model info reports the version and run, so an answer can be traced to its training run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohortcast.errors import MissingInputError

log = logging.getLogger(__name__)


@dataclass
class ForecasterSource:
    location: str  # what the config named
    folder: Path  # the local Forecaster folder loaded
    mlflow_run_id: str | None = None
    registered: dict[str, Any] = field(default_factory=dict)  # {"name", "version"} for models:/ URIs

    def info(self) -> dict[str, Any]:
        from cohortcast.io.stage_outputs import read_marker

        # A registry URI is what the operator configured; a local folder is named, not
        # located (server paths are not echoed to clients).
        shown = self.location if _is_uri(self.location) else Path(self.location).name
        return {
            "forecaster": shown,
            "model_version": (read_marker(self.folder) or {}).get("key"),
            "mlflow_run_id": self.mlflow_run_id,
            "registered_model": self.registered or None,
        }


def _is_uri(location: str) -> bool:
    return "://" in location or location.startswith(("models:/", "runs:/"))


def _registered(uri: str) -> dict[str, Any]:
    """models:/name/version or models:/name@alias -> {"name", "version"} from the registry."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return {}
    ref = uri[len("models:/") :].strip("/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref and ref.rsplit("/", 1)[1].isdigit():
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        return {}
    return {"name": version.name, "version": str(version.version)}


def resolve_forecaster(location: str, download_root: str | Path | None = None) -> ForecasterSource:
    """Local folder as is; an MLflow URI is downloaded (under download_root, else a
    temporary folder) and the Forecaster artifact inside the pyfunc model is used."""
    path = Path(location)
    if path.is_dir():
        return ForecasterSource(location, path)
    if not _is_uri(location):
        raise MissingInputError(f"serve.forecaster {location!r} is neither a Forecaster folder nor an MLflow model URI")
    import mlflow.artifacts
    from mlflow.models import Model

    from cohortcast.tracking.forecaster_pyfunc import ARTIFACT

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(download_root) if download_root else None
        )
    )
    model = Model.load(str(local / "MLmodel"))
    artifacts = model.flavors.get("python_function", {}).get("artifacts", {})
    if ARTIFACT not in artifacts:
        raise ValueError(f"{location} is an MLflow model without a {ARTIFACT!r} artifact: not a cohortcast Forecaster")
    return ForecasterSource(
        location, local / artifacts[ARTIFACT]["path"], mlflow_run_id=model.run_id, registered=_registered(location)
    )


_warned_fallback: set[str] = set()


def study_preprocessing(info: dict[str, Any], ingest) -> tuple[Any, str | None]:
    """How to crop an uploaded study for this Forecaster: (settings, None), or (None, why
    the service cannot). The settings saved with the model come first; a Forecaster saved
    without them (format 2) falls back to the service's `ingest` config, with a warning,
    and only when its crop size is the model's."""
    from cohortcast.models.preprocessing import CropPreprocessing

    if info.get("preprocessing"):
        return CropPreprocessing.from_dict(info["preprocessing"]), None
    if [ingest.crop_size] * 2 != list(info["crop_shape"]):
        return None, (
            f"service misconfigured: the Forecaster was saved without its crop preprocessing and "
            f"ingest.crop_size {ingest.crop_size} does not fit its {info['crop_shape']} crops"
        )
    if info.get("forecaster") not in _warned_fallback:
        _warned_fallback.add(info.get("forecaster"))
        log.warning(
            "Forecaster %s carries no crop preprocessing (saved before format 3): study uploads are cut "
            "with the service's ingest settings, which must be the training ones",
            info.get("forecaster"),
        )
    return CropPreprocessing.from_ingest(ingest), None
