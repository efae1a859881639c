"""What a person watching a terminal or `ray job logs -f` sees from cohortcast: log
lines of the `cohortcast` logger carry a `[cohortcast]` prefix, so our summaries stand
out among Ray Data's progress bars and Ray's own log lines (which stay as they are).
One setup for the CLI and the `jobs/*.py` entry points; standard library only, so any
package may use it."""

from __future__ import annotations

import logging

PREFIX = "[cohortcast]"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class CohortcastFormatter(logging.Formatter):
    """FORMAT, with PREFIX in front of records from the cohortcast logger tree."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ours = record.name == "cohortcast" or record.name.startswith("cohortcast.")
        return f"{PREFIX} {line}" if ours else line


def configure_logging(verbose: bool = False) -> None:
    """Root logging to stderr at INFO (DEBUG when `verbose`), like `logging.basicConfig`:
    nothing changes when the root logger already has a handler (pytest, an embedding
    application)."""
    handler = logging.StreamHandler()
    handler.setFormatter(CohortcastFormatter(FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def ensure_info_reaches_stderr() -> None:
    """Inside a Ray worker: Ray Train (v2) gives its workers a root handler at INFO, plain
    Ray workers have none (INFO records are dropped). Where nothing would show our INFO
    lines, the cohortcast logger gets its own stderr handler; Ray streams a worker's
    stderr to the driver, so `ray job logs -f` shows them."""
    logger = logging.getLogger("cohortcast")
    if logger.hasHandlers() and logger.getEffectiveLevel() <= logging.INFO:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(CohortcastFormatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # root's handler, if any, would drop or repeat these lines


def format_duration(seconds: float) -> str:
    """45s, 3m10s, 2h05m: short enough for a progress line, exact enough for an ETA."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_s: float) -> str:
    """412, 38, 3.2, 0.41: whole numbers from 10 up, two significant digits below."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"
