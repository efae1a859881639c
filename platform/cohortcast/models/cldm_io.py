"""Folders for the CLDM models (forecaster, regressor, decoders): `<kind>.json` (format
version, cohortcast version, kind, the config that built the weights, extras) and
`<kind>.safetensors`, written atomically. Loading refuses another kind, another format,
a config that differs from the one the caller expects, and weights that do not fit."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cohortcast import __version__
from cohortcast.config import flatten, to_dict
from cohortcast.io.atomic import atomic_folder
from cohortcast.models.errors import ForecasterLoadError

FORMAT_VERSION = 1


def _paths(folder: Path, kind: str) -> tuple[Path, Path]:
    return folder / f"{kind}.json", folder / f"{kind}.safetensors"


def save_model_folder(
    folder: str | Path,
    kind: str,
    cfg: Any,
    module: nn.Module,
    extra: dict | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> None:
    """`cfg` a config dataclass; `write_more(tmp)` adds files (e.g. a Hugging Face LM)."""
    with atomic_folder(folder, overwrite=True) as tmp:
        config_file, weights_file = _paths(tmp, kind)
        meta = {
            "format_version": FORMAT_VERSION,
            "cohortcast_version": __version__,
            "kind": kind,
            "config": to_dict(cfg),
            **(extra or {}),
        }
        config_file.write_text(json.dumps(meta, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(weights_file))
        if write_more is not None:
            write_more(tmp)


def read_model_meta(folder: str | Path, kind: str) -> dict:
    folder = Path(folder)
    config_file, weights_file = _paths(folder, kind)
    if not config_file.is_file() or not weights_file.is_file():
        found = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
        raise ForecasterLoadError(
            f"{folder}: not a {kind} folder (needs {config_file.name} and {weights_file.name}; found {found})"
        )
    meta = json.loads(config_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != kind:
        raise ForecasterLoadError(
            f"{folder}: {meta.get('kind')!r} format {meta.get('format_version')} (cohortcast "
            f"{meta.get('cohortcast_version')}); this cohortcast {__version__} reads {kind!r} format {FORMAT_VERSION}"
        )
    return meta


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    """A pattern ending in "." is a section prefix; any other names one field."""
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def check_config(
    folder: str | Path, saved: dict, expected: Any, fields: Iterable[str] = (), ignore: Iterable[str] = ()
) -> None:
    """ForecasterLoadError naming every field where the saved config differs from the
    `expected` dataclass: the `fields` (all when empty) except the `ignore` ones (run-time
    settings). Patterns ending in "." name whole sections, others single fields."""
    keep, skip = tuple(fields), tuple(ignore)
    mine, theirs = flatten(saved), flatten(expected)
    differs = [
        f"{k}: saved {mine.get(k)!r}, expected {theirs.get(k)!r}"
        for k in sorted(set(mine) | set(theirs))
        if (not keep or _matches(k, keep)) and not _matches(k, skip) and mine.get(k) != theirs.get(k)
    ]
    if differs:
        raise ForecasterLoadError(
            f"{folder}: saved with another config ({len(differs)} field(s)): " + "; ".join(differs[:6])
        )


def load_weights(folder: str | Path, kind: str, module: nn.Module, map_location: str = "cpu") -> None:
    """The folder's weights into `module`; ForecasterLoadError listing missing, unexpected
    and mis-shaped tensors."""
    state = load_file(str(_paths(Path(folder), kind)[1]), device=map_location)
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ForecasterLoadError(
            f"{folder}: weights do not fit the config ({len(problems)} problem(s)): " + "; ".join(problems[:5])
        )
    with torch.no_grad():
        module.load_state_dict(state)
