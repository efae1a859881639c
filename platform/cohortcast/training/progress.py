"""The stage loop's progress line, logged by world rank 0 every `log_every` steps:

    stage vae step 120/600 loss 0.0123 412 samples/s ETA 3m10s

Logged, not reported: a Ray Train report costs about a second, a log line nothing, and
a worker's log reaches `ray job logs -f` (Ray streams worker output to the driver)."""

from __future__ import annotations

import re

from cohortcast.console import ensure_info_reaches_stderr, format_duration, format_rate

# pipeline stages run as "<stage>-<16 hex digits of the stage key>": the key is noise here
_KEY_SUFFIX = re.compile(r"-[0-9a-f]{16}$")


def stage_label(run_name: str) -> str:
    """The Ray Train run name without its stage-key suffix ("vae-3f2a..." -> "vae")."""
    return _KEY_SUFFIX.sub("", run_name) or run_name


def eta_seconds(step: int, total: int, first_step: int, elapsed_s: float) -> float | None:
    """Seconds to `total` at this run's pace so far: the steps done since the loop
    started at `first_step` (a resumed run's earlier steps took no time here) over the
    time they took, validation and checkpoints included. None before the first step."""
    done = step - first_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(0, total - step) * elapsed_s / done


class StageProgress:
    """World rank 0's progress lines for one stage run (see `for_rank`)."""

    def __init__(self, name: str, total_steps: int, first_step: int):
        self.name, self.total, self.first_step = name, total_steps, first_step

    @classmethod
    def for_rank(cls, rank: int, run_name: str, total_steps: int, first_step: int) -> StageProgress | None:
        """Rank 0 only (one line per step for the job, not one per worker)."""
        if rank != 0:
            return None
        ensure_info_reaches_stderr()
        return cls(stage_label(run_name), total_steps, first_step)

    def line(self, step: int, loss: float, samples_per_s: float, elapsed_s: float) -> str:
        eta = eta_seconds(step, self.total, self.first_step, elapsed_s)
        return (
            f"stage {self.name} step {step}/{self.total} loss {loss:.4g} {format_rate(samples_per_s)} samples/s "
            f"ETA {format_duration(eta) if eta is not None else '?'}"
        )
