"""Weights come from local folders only: no model hub is reachable at run time."""

from __future__ import annotations

from pathlib import Path

from cohortcast.errors import MissingInputError


def local_model_folder(path: str | Path, setting: str) -> Path:
    """The folder if it holds a Hugging Face / diffusers model (config.json), else a
    FileNotFoundError that names the config setting to fix."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MissingInputError(
            f"{folder}: not a model folder (no config.json); the model hub is not used, "
            f"point {setting} at local weights"
        )
    return folder
