"""Local weights for the universal encoder: a folder written by UniversalEncoder.save()
(config.json + weights.safetensors, or weights.pt) or a bare state-dict file
(.safetensors, or a torch.save'd dict). No hub. Nothing is loaded unless every key is
there, none is extra and every shape fits: a partial load would leave random weights
behind without a word, so mismatches are refused, all of them listed in one error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from cohortcast.config import from_dict, to_dict
from cohortcast.config.cldm import ARCHITECTURE_FIELDS, EncoderConfig
from cohortcast.errors import MissingInputError
from cohortcast.io.atomic import atomic_folder
from cohortcast.models.errors import PretrainedWeightsError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("weights.safetensors", "weights.pt")
SETTING = "cldm.encoder.pretrained_path"
_LISTED = 12  # keys named per kind in an error; the rest are counted


def save_encoder(model: nn.Module, cfg: EncoderConfig, folder: str | Path) -> None:
    """config.json + weights.safetensors, written atomically (replaces `folder`)."""
    from safetensors.torch import save_file

    saved = to_dict(cfg) | {"pretrained_path": None}  # these weights replace whatever it started from
    with atomic_folder(folder, overwrite=True) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(saved, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILES[0]))


def read_config(folder: str | Path) -> EncoderConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MissingInputError(f"{folder}: no {CONFIG_FILE}; not a folder saved by UniversalEncoder.save()")
    try:
        cfg = from_dict(EncoderConfig, json.loads(path.read_text()), "encoder")
    except (ValueError, TypeError) as exc:  # ConfigError, JSONDecodeError
        raise PretrainedWeightsError(f"{path}: not a readable encoder config ({exc})") from None
    cfg.pretrained_path = None
    return cfg


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise MissingInputError(
            f"{path}: no such file or folder; {SETTING} must name local weights (a folder saved by "
            "UniversalEncoder.save() or a state-dict file); the model hub is not used"
        )
    for name in WEIGHTS_FILES:
        if (path / name).is_file():
            return path / name
    raise MissingInputError(f"{path}: no {' or '.join(WEIGHTS_FILES)} in this folder (set by {SETTING})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a weights file. A checkpoint dict holding the weights under
    "state_dict" or "model" is unwrapped, and a "module." prefix on every key (DDP,
    DeepSpeed) is dropped: neither changes which weights are meant."""
    path = _weights_file(Path(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a weights file at all
        raise PretrainedWeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _architecture_mismatch(saved: EncoderConfig, cfg: EncoderConfig) -> list[str]:
    return [
        f"{name}: weights {getattr(saved, name)!r}, model {getattr(cfg, name)!r}"
        for name in ARCHITECTURE_FIELDS
        if getattr(saved, name) != getattr(cfg, name)
    ]


def _listed(items: list[str]) -> str:
    more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load local weights into `model` (a UniversalEncoder) exactly, or raise a
    PretrainedWeightsError listing every missing, unexpected and wrongly shaped key (and,
    for a saved folder, the architecture fields its config.json disagrees on)."""
    path = Path(path)
    cfg: EncoderConfig = model.cfg
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        differs = _architecture_mismatch(read_config(path), cfg)
        if differs:
            raise PretrainedWeightsError(
                f"{path}: saved for another encoder architecture ({'; '.join(differs)}); "
                f"set the cldm.encoder fields to the saved ones or point {SETTING} elsewhere"
            )
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (weights {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{len(found)} {kind}: {_listed(found)}"
            for kind, found in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", shapes))
            if found
        ]
        raise PretrainedWeightsError(
            f"{path}: the weights do not fit this encoder (dim {cfg.dim}, depth {cfg.depth}, "
            f"patches {tuple(cfg.patch_2d)} / {tuple(cfg.patch_3d)}): {'; '.join(parts)}"
        )
    model.load_state_dict(state, strict=True)
    log.info("universal encoder: loaded %d tensors from %s", len(state), path)
