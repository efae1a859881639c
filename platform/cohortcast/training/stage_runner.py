"""One training stage of any job, end to end: skip it when its output is valid for its
key (io.stage_outputs), else train it on Ray Train (resuming the run named after the
key), export the result into its folder, write the marker and report it to the job's
MLflow child run. The NAMD job, the evaluation's evaluator and the sweep's trials all
train their stages through a StageRunner.

`runs` is the job's tracking (tracking.job_runs.JobRuns): passed in, never imported,
because training sits below tracking. The runner calls its start_child, finish_child,
fail_child, tracking_for_workers and loss_history."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohortcast.config.training import STAGES, ScalingSettings
from cohortcast.errors import CohortcastError
from cohortcast.io import stage_outputs as outputs

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    name: str
    status: str  # "trained", "up to date", "reused" (unlisted stage, existing output), "built"
    output: str
    seconds: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class StageNotAvailable(CohortcastError, RuntimeError):
    """A stage the job needs is neither to be trained now nor finished in its output folder."""

    http_status = 409


def loss_ends(losses: list[float]) -> tuple[float, float]:
    """Mean loss over the first and the last quarter of the logged steps: single
    diffusion steps are too noisy (random timesteps) to compare one to one."""
    k = max(1, len(losses) // 4)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


class StageRunner:
    def __init__(
        self,
        output: str | Path,
        scaling: ScalingSettings,
        stages: Collection[str] | None = None,
        train_callbacks: list | None = None,
        known: Collection[str] = STAGES,
        stages_setting: str = "training.stages",
    ):
        """Stage outputs go to `<output>/<stage>/` unless a stage names its folder.
        `stages`: which of the job's `known` stages (default: NAMD's, config.training.STAGES;
        the CLDM job passes config.cldm.CLDM_STAGES) it may train (its `stages` setting);
        a known stage left out reuses its existing output. None: all. `stages_setting`
        names that setting in messages.
        `train_callbacks` go into every stage's Ray Train RunConfig (a sweep trial
        passes Tune's TuneReportCallback)."""
        self.output = Path(output)
        self.scaling = scaling
        self.stages = stages
        self.train_callbacks = train_callbacks
        self.known, self.stages_setting = tuple(known), stages_setting
        self.reports: list[StageReport] = []

    def train(
        self,
        runs,
        name: str,
        key: str,
        worker_loop,
        loop_config: dict,
        datasets: Callable[[], dict],
        export: Callable[[Any, Path], None],
        params: dict[str, Any],
        folder: Path | None = None,
        best: str | None = None,
    ) -> Path:
        """`datasets` is called only when the stage trains: a skipped stage reads no data.
        The output goes to `folder` (default: `<output>/<name>`). `best`: a weights file
        the workers keep the best validation weights in; exported instead of the last
        checkpoint when it exists."""
        from cohortcast.training.runner import run_stage

        folder = Path(folder) if folder is not None else self.output / name
        run_id = runs.start_child(name, {**params, "stage_key": key})
        if outputs.is_valid(folder, key):
            marker = outputs.read_marker(folder)
            self.report(
                runs,
                run_id,
                StageReport(
                    name,
                    "up to date",
                    str(folder),
                    0.0,
                    marker.get("first_loss"),
                    marker.get("last_loss"),
                    marker.get("metrics", {}),
                ),
            )
            return folder
        if self.stages is not None and name in self.known and name not in self.stages:
            return self._reuse_unlisted(runs, run_id, name, folder)
        outputs.invalidate(folder)
        started = time.perf_counter()
        try:
            data = datasets()  # before the loop config is sent: it may complete the model config
            result = run_stage(
                f"{name}-{key}",
                worker_loop,
                {**loop_config, "tracking": runs.tracking_for_workers(run_id)},
                data,
                self.scaling,
                self.train_callbacks,
            )
            source = best if best and Path(best).is_file() else result.checkpoint
            if source is best:
                log.info("stage %s: exporting the best validation weights (%s)", name, best)
            export(source, folder)
        except BaseException:
            runs.fail_child(run_id)
            raise
        first, last = loss_ends(runs.loss_history(run_id) or [result.metrics["loss/total"]])
        metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
        report = StageReport(name, "trained", str(folder), time.perf_counter() - started, first, last, metrics)
        outputs.write_marker(
            folder,
            key,
            {
                "first_loss": report.first_loss,
                "last_loss": report.last_loss,
                "metrics": metrics,
                "seconds": report.seconds,
            },
        )
        self.report(runs, run_id, report)
        return folder

    def _reuse_unlisted(self, runs, run_id, name: str, folder: Path) -> Path:
        marker = outputs.read_marker(folder)
        if marker is None:
            runs.fail_child(run_id)
            raise StageNotAvailable(
                f"stage {name!r} is not in {self.stages_setting} and {folder} holds no finished "
                f"output; add it to {self.stages_setting}"
            )
        log.warning(
            "stage %s is not in %s: using its existing output %s, trained with another config (key %s)",
            name,
            self.stages_setting,
            folder,
            marker.get("key"),
        )
        self.report(
            runs,
            run_id,
            StageReport(
                name,
                "reused",
                str(folder),
                0.0,
                marker.get("first_loss"),
                marker.get("last_loss"),
                marker.get("metrics", {}),
            ),
        )
        return folder

    def report(self, runs, run_id, report: StageReport) -> None:
        """Record a stage's outcome (also for work that is not a Ray Train stage, such as
        the NAMD job's latent cache) and close its MLflow child run."""
        self.reports.append(report)
        runs.finish_child(run_id, report.status, {k: v for k, v in vars(report).items()})
        log.info("stage %s: %s (%s)", report.name, report.status, report.output)


def format_stages(reports: list[StageReport]) -> list[str]:
    """A job summary's table: per stage its status, time, loss (mean of the first ->
    last quarter of steps) and validation metrics."""
    width = max([11, *(len(r.name) for r in reports)])
    lines = [f"{'stage':<{width}} {'status':<11} {'time':>7}  loss, mean of first -> last quarter of steps"]
    for s in reports:
        loss = f"{s.first_loss:.4f} -> {s.last_loss:.4f}" if s.first_loss is not None else "-"
        lines.append(f"{s.name:<{width}} {s.status:<11} {s.seconds:>6.0f}s  {loss}")
        val = {k: v for k, v in s.metrics.items() if k.startswith("val/")}
        if val:
            lines.append(
                " " * (width + 1) + "validation: " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in sorted(val.items()))
            )
    return lines
