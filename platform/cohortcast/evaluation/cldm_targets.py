"""Which exams the CLDM evaluation forecasts, and the batched, cached forecasts of them.

Targets (one split, one study kind): every follow-up exam (position >= 1 in its
patient's trajectory) forecast from all its priors, the most recent `temporal.max_exams`
of them. Table 1 (CT) keeps the targets whose study and last prior both have an ILD mask
(fibrosis patients; copy-last and progression Dice need the prior's) and whose lung mask
is known (aVD); Table 2 (radiographs) those with a reference report. The "k priors" rows
re-use the same targets with their context cut to the k most recent priors.

Forecasts run `batch_size` targets per `forecast` call (the model runs them in its fixed
`scheduler.micro_batch` rows, so the samples do not depend on the batching) and each
method's results can be cached under a key of the model folders' contents and the
settings (`cache_key`): a rerun with the same models and settings only re-scores."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cohortcast.errors import CohortcastError
from cohortcast.training.study_trajectories import Examples, StudyTrajectories, examples_for, prior_tokens

log = logging.getLogger(__name__)


class CLDMEvaluationError(CohortcastError, ValueError):
    """The split or the models cannot support the CLDM evaluation (the message says why)."""


@dataclass
class Targets:
    """The forecast targets of one table: `examples` with every available prior."""

    kind: str  # "CT" or "radiograph"
    trajectories: StudyTrajectories
    examples: Examples
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> follow-ups left out

    def __len__(self) -> int:
        return len(self.examples.target_row)

    @property
    def patients(self) -> list[str]:
        return [str(self.trajectories.patients[t]) for t in self.examples.trajectory]

    @property
    def case_ids(self) -> list[str]:
        """`<patient pseudonym>/<study pseudonym>`: the sampler's per-case seed key."""
        t = self.trajectories
        return [f"{self.patients[i]}/{t.studies[r]}" for i, r in enumerate(self.examples.target_row)]

    @property
    def num_priors(self) -> np.ndarray:
        return self.examples.exam_mask.sum(axis=1)

    def truncated(self, k: int) -> Examples:
        """The same targets with only their k most recent priors (fewer where fewer exist)."""
        ex = self.examples
        picks = [(int(t), int(p)) for t, p in zip(ex.trajectory, self._positions())]
        return examples_for(self.trajectories, picks, ex.prior_rows.shape[1], [k] * len(picks))

    def _positions(self) -> np.ndarray:
        offsets = self.trajectories.offsets[self.examples.trajectory]
        return self.examples.target_row - offsets


def _follow_ups(trajectories: StudyTrajectories) -> list[tuple[int, int]]:
    return [(i, p) for i, n in enumerate(trajectories.num_exams) for p in range(1, int(n))]


def _cap(picks: list[tuple[int, int]], max_targets: int, seed: int) -> list[tuple[int, int]]:
    if not max_targets or len(picks) <= max_targets:
        return picks
    keep = np.sort(np.random.default_rng(seed).choice(len(picks), max_targets, replace=False))
    return [picks[i] for i in keep]


def ct_targets(trajectories: StudyTrajectories, max_priors: int, max_targets: int = 0, seed: int = 0) -> Targets:
    """Table 1's targets: CT follow-ups with a mask on the target and its last prior and a
    positive lung voxel count, forecast from up to `max_priors` priors."""
    t = trajectories
    if t.masks is None:
        raise CLDMEvaluationError("the CT trajectories carry no masks: load them with the ingested table")
    keep, skipped = [], {"no ILD mask on the target or its last prior": 0, "no lung mask (aVD undefined)": 0}
    for traj, pos in _follow_ups(t):
        row = int(t.offsets[traj]) + pos
        if not (t.has_mask[row] and t.has_mask[row - 1]):
            skipped["no ILD mask on the target or its last prior"] += 1
        elif t.lung_voxels[row] <= 0:
            skipped["no lung mask (aVD undefined)"] += 1
        else:
            keep.append((traj, pos))
    return _targets("CT", t, keep, max_priors, max_targets, seed, skipped)


def report_targets(trajectories: StudyTrajectories, max_priors: int, max_targets: int = 0, seed: int = 0) -> Targets:
    """Table 2's targets: radiograph follow-ups with a reference report."""
    t = trajectories
    keep, skipped = [], {"no reference report": 0}
    for traj, pos in _follow_ups(t):
        if t.reports[int(t.offsets[traj]) + pos].strip():
            keep.append((traj, pos))
        else:
            skipped["no reference report"] += 1
    return _targets("radiograph", t, keep, max_priors, max_targets, seed, skipped)


def _targets(kind, t, keep, max_priors, max_targets, seed, skipped) -> Targets:
    if not keep:
        raise CLDMEvaluationError(
            f"no {kind} follow-up exam can be a target ({', '.join(f'{v} {k}' for k, v in skipped.items())})"
        )
    capped = _cap(keep, max_targets, seed)
    if len(capped) < len(keep):
        skipped[f"left out by max_targets={max_targets}"] = len(keep) - len(capped)
    return Targets(kind, t, examples_for(t, capped, max_priors), skipped)


def subset(examples: Examples, idx: np.ndarray) -> Examples:
    return Examples(*(getattr(examples, f)[idx] for f in Examples.__dataclass_fields__))


def forecast_batches(
    model,
    targets: Targets,
    examples: Examples,
    num_samples: int,
    seed: int,
    steps: int,
    batch_size: int,
    label: str,
) -> Iterator[tuple[np.ndarray, object]]:
    """(target indices, TokenForecast) per batch of `batch_size` targets, with a progress
    line per batch (targets done / total, elapsed)."""
    import torch

    n, ids, started = len(targets), targets.case_ids, time.perf_counter()
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        ex = subset(examples, idx)
        tokens = torch.from_numpy(prior_tokens(targets.trajectories, ex))
        forecast = model.forecast(
            tokens,
            torch.from_numpy(ex.days_before_target),
            torch.from_numpy(ex.exam_mask),
            [ids[i] for i in idx],
            num_samples=num_samples,
            seed=seed,
            steps=steps,
        )
        yield idx, forecast
        log.info("%s: %d/%d targets forecast, %.0f s", label, idx[-1] + 1, n, time.perf_counter() - started)


# ----- the per-method cache ---------------------------------------------------------------


def cache_key(method: str, folders: list[str], case_ids: list[str], settings: dict) -> str:
    payload = json.dumps({"method": method, "models": folders, "cases": case_ids, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ResultCache:
    """Per-method results as `<slug>-<key>.npz` in `folder` (None: no caching)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None

    def get_or_compute(self, slug: str, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict:
        if self.folder is None:
            return compute()
        path = self.folder / f"{slug}-{key}.npz"
        if path.is_file():
            log.info("%s: reusing cached results %s", slug, path.name)
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        out = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **out)
        tmp.replace(path)
        return out
