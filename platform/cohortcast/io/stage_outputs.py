"""Stage outputs and when they are valid.

Each training stage exports into `<training.output>/<stage>/` and, last, writes
`stage.json` with the hash of everything the output depends on (its configs and the
keys of its inputs). A stage whose folder holds a `stage.json` with the current key is
skipped; anything else (no marker, another key, a half-written export) is retrained.
The Ray Train run is named after the key too, so an interrupted stage resumes from its
own latest checkpoint and a changed config never resumes from a stale one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cohortcast.config import to_dict
from cohortcast.io.atomic import write_text_atomic

MARKER = "stage.json"


def stage_key(*parts: Any) -> str:
    blob = json.dumps(
        [to_dict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def is_valid(folder: str | Path, key: str) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("key") == key


def invalidate(folder: str | Path) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)


def write_marker(folder: str | Path, key: str, summary: dict[str, Any]) -> None:
    write_text_atomic(Path(folder) / MARKER, json.dumps({"key": key, **summary}, indent=2, default=str))


def folder_digest(folder: str | Path | None) -> str:
    """sha256 over a model folder's files (relative names and contents): what a cached
    result or a finished forecast was computed with."""
    if folder is None:
        return "none"
    root, h = Path(folder), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
