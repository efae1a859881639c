"""Atomic folder outputs: build under a hidden temp name next to the target, rename
when complete. An interrupted run leaves only `.NAME.tmp-*` folders, which never look
finished and are cleared by the next run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cohortcast.errors import OutputExistsError


def clear_stale_temps(target: Path) -> int:
    """Remove temp folders an interrupted run left beside `target`; returns how many."""
    count = 0
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
            count += 1
    return count


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists (use overwrite to replace it)")
    clear_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Move the old output aside first so the swap leaves no window without one.
            old = target.parent / f".{target.name}.tmp-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
