"""Progress output: the stage loop's rank-0 line (rate and ETA arithmetic, format) and
the `[cohortcast]` prefix that makes our log lines stand out in a job's output."""

from __future__ import annotations

import contextlib
import logging
import re

import pytest

from cohortcast.console import (
    CohortcastFormatter,
    configure_logging,
    ensure_info_reaches_stderr,
    format_duration,
    format_rate,
)
from cohortcast.training.progress import StageProgress, eta_seconds, stage_label

LINE = re.compile(
    r"^stage (?P<name>\S+) step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) "
    r"(?P<rate>[\d.]+) samples/s ETA (?P<eta>\S+)$"
)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (44.6, "45s"),
        (59.4, "59s"),
        (60, "1m00s"),
        (190, "3m10s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7530, "2h05m"),
        (100 * 3600, "100h00m"),
        (-3, "0s"),
    ],
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(412.4, "412"), (10.0, "10"), (3.21, "3.2"), (0.414, "0.41"), (0.0, "0")])
def test_rates(rate, text):
    assert format_rate(rate) == text


def test_eta_is_the_remaining_steps_at_this_runs_pace():
    # 120 of 600 steps in 95 s: 480 steps left at 95/120 s each.
    assert eta_seconds(120, 600, 0, 95.0) == pytest.approx(480 * 95 / 120)
    # Resumed at step 400: the 50 steps this run did took the 10 s, not 450.
    assert eta_seconds(450, 600, 400, 10.0) == pytest.approx(150 * 10 / 50)
    assert eta_seconds(600, 600, 0, 95.0) == 0.0
    assert eta_seconds(400, 600, 400, 5.0) is None  # no step done in this run yet


def test_stage_line_has_step_total_loss_rate_and_eta():
    progress = StageProgress(stage_label("vae-3f2a1b9c0d1e2f3a"), total_steps=600, first_step=0)
    line = progress.line(120, loss=0.012345, samples_per_s=412.4, elapsed_s=47.5)
    assert line == "stage vae step 120/600 loss 0.01235 412 samples/s ETA 3m10s"  # 480 x 47.5 / 120 = 190 s
    fields = LINE.match(line).groupdict()
    assert (fields["step"], fields["total"], fields["eta"]) == ("120", "600", "3m10s")
    assert stage_label("vae-resume") == "vae-resume"  # only a 16-hex stage key is dropped


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)


def test_our_log_lines_carry_the_prefix_and_others_do_not():
    fmt = CohortcastFormatter("%(levelname)s %(name)s: %(message)s")
    assert fmt.format(_record("cohortcast.data.ingest", "read 3 studies")) == (
        "[cohortcast] INFO cohortcast.data.ingest: read 3 studies"
    )
    assert fmt.format(_record("ray.data", "Execution plan")) == "INFO ray.data: Execution plan"
    assert not fmt.format(_record("cohortcastle", "x")).startswith("[cohortcast]")


@contextlib.contextmanager
def bare_logging():
    """Root and cohortcast loggers without handlers (as in a plain Ray worker), restored
    after. Entered in the test body: pytest adds its own root handlers per test phase."""
    root, ours = logging.getLogger(), logging.getLogger("cohortcast")
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    root.handlers, ours.handlers = [], []
    root.setLevel(logging.WARNING)
    ours.setLevel(logging.NOTSET)
    try:
        yield root, ours
    finally:
        root.handlers, ours.handlers = saved[0], saved[2]
        root.setLevel(saved[1])
        ours.setLevel(saved[3])
        ours.propagate = saved[4]


def test_only_rank_zero_prints():
    with bare_logging():  # rank 0 makes sure its INFO lines reach stderr
        assert StageProgress.for_rank(1, "vae", 10, 0) is None
        assert StageProgress.for_rank(0, "ldm_cond-0123456789abcdef", 10, 0).name == "ldm_cond"


def test_cli_logging_prefixes_our_info_lines(capsys):
    with bare_logging():
        configure_logging()
        logging.getLogger("cohortcast.inference.cohort_forecast").info("forecast: 4 cases")
        # another library's logger through the root handler (not ray's: once Ray is
        # imported, its loggers have their own handlers and do not propagate)
        logging.getLogger("otherlib.data").info("progress")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[cohortcast] ")
    assert err[0].endswith("INFO cohortcast.inference.cohort_forecast: forecast: 4 cases")
    assert err[1].endswith("INFO otherlib.data: progress") and not err[1].startswith("[cohortcast]")


def test_a_worker_without_logging_still_shows_our_info_lines(capsys):
    with bare_logging():
        logging.getLogger("cohortcast.training.stage_loop").info("dropped")  # a plain Ray worker today
        ensure_info_reaches_stderr()
        ensure_info_reaches_stderr()  # idempotent: one handler, one copy of each line
        logging.getLogger("cohortcast.training.stage_loop").info("stage vae step 1/2")
    err = capsys.readouterr().err
    assert "dropped" not in err and err.count("stage vae step 1/2") == 1 and "[cohortcast]" in err


def test_a_worker_with_ray_train_logging_is_left_alone():
    with bare_logging() as (root, ours):
        root.addHandler(logging.NullHandler())  # Ray Train v2 gives its workers a root handler at INFO
        root.setLevel(logging.INFO)
        ensure_info_reaches_stderr()
        assert ours.handlers == [] and ours.propagate
