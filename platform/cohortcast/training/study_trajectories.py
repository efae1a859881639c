"""Longitudinal rows for CLDM part 2, from the study latent cache (+ the ingested masks).

One `StudyTrajectories` per (split, study kind): every patient's studies of that kind
sorted by date, their tokens ([CLS] first, (1 + N, dim)), days since the patient's
first exam, and what the decoders and metrics read (CT: the study's ILD mask on the
ingested grid, whether it has one, the lung voxels for aVD; radiographs: the report).
The tables are small next to the images they came from (a debug CT study is 513 x 64
floats), so a stage holds its split in memory; each worker takes every world-size-th
patient.

`draw_examples` turns trajectories into training examples: per trajectory one target
exam among its follow-ups (fresh per epoch), its priors every earlier exam (the most
recent `max_priors` kept), optionally truncated at random to the k most recent
(k uniform in 1..n: CLDM's 1, 3 and all priors all in distribution)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cohortcast.errors import MissingInputError

CACHE_COLUMNS = ("patient", "study", "days_since_baseline", "cls", "tokens", "has_mask", "lung_voxels", "report_text")


@dataclass
class StudyTrajectories:
    dims: int
    patients: list[str]
    offsets: np.ndarray  # (P + 1,) the exams of patient i are rows offsets[i]:offsets[i + 1], by date
    studies: list[str]
    days: np.ndarray  # (R,) days since the patient's first exam
    tokens: np.ndarray  # (R, 1 + N, dim) float32, [CLS] first
    has_mask: np.ndarray  # (R,) bool
    lung_voxels: np.ndarray  # (R,) int64 (0 when unknown)
    reports: list[str]  # (R,) "" when none
    masks: np.ndarray | None = None  # (R, *grid) uint8 for CT (dims 3), else None
    mask_affine: np.ndarray | None = None  # (R, 4, 4) the masks' grid in patient space (LPS mm)
    extra: dict = field(default_factory=dict)

    @property
    def num_exams(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.patients)

    def rows_of(self, i: int) -> np.ndarray:
        return np.arange(self.offsets[i], self.offsets[i + 1])

    def subset(self, keep: list[int]) -> StudyTrajectories:
        """The trajectories `keep` (indices), in that order."""
        rows = np.concatenate([self.rows_of(i) for i in keep]) if keep else np.zeros(0, np.int64)
        sizes = [self.offsets[i + 1] - self.offsets[i] for i in keep]
        return StudyTrajectories(
            self.dims,
            [self.patients[i] for i in keep],
            np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            [self.studies[r] for r in rows],
            self.days[rows],
            self.tokens[rows],
            self.has_mask[rows],
            self.lung_voxels[rows],
            [self.reports[r] for r in rows],
            None if self.masks is None else self.masks[rows],
            None if self.mask_affine is None else self.mask_affine[rows],
        )

    def shard(self, rank: int, world: int) -> StudyTrajectories:
        """Every world-th patient from `rank`: each worker sees its own patients."""
        return self.subset(list(range(rank, len(self), world)))

    def with_follow_up(self) -> StudyTrajectories:
        """Only the trajectories with at least one prior and a target (2+ exams)."""
        return self.subset([i for i, n in enumerate(self.num_exams) if n >= 2])


def _tensor(table, name: str, dtype) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks().to_numpy_ndarray(), dtype)


def _read_masks(ingested: Path, split: str, studies: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ingested CT masks of `studies` (in that order) and their grids' affines."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    folder = ingested / "studies" / f"split={split}"
    ds = pads.dataset(str(folder), format="parquet")
    table = ds.to_table(columns=["study", "mask", "volume_affine"], filter=pc.field("dims") == 3)
    index = {s: i for i, s in enumerate(table.column("study").to_pylist())}
    missing = [s for s in studies if s not in index]
    if missing:
        raise MissingInputError(
            f"{ingested}: {len(missing)} cached CT studies are not in the ingested table (e.g. {missing[0]}); "
            "the study latent cache was built from other ingested data"
        )
    order = np.asarray([index[s] for s in studies], np.int64)
    table = table.take(order)
    masks = _tensor(table, "mask", np.uint8)
    affines = _tensor(table, "volume_affine", np.float64).reshape(-1, 4, 4)
    return masks, affines


def load_trajectories(
    cache: str | Path, split: str, dims: int, ingested: str | Path | None = None
) -> StudyTrajectories | None:
    """The split's studies of one kind as trajectories (patients sorted by pseudonym,
    exams by date); with `ingested` (CT), the masks too. None when the split has none."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  (registers Ray's tensor extension types with pyarrow)

    folder = Path(cache) / "studies" / f"dims={dims}" / f"split={split}"
    if not folder.is_dir():
        return None
    ds = pads.dataset(str(folder), format="parquet")
    columns = [c for c in CACHE_COLUMNS if c in ds.schema.names]
    table = ds.to_table(columns=columns)
    if table.num_rows == 0:
        return None
    patients = table.column("patient").to_pylist()
    days = np.asarray(table.column("days_since_baseline").to_pylist(), np.float32)
    studies = table.column("study").to_pylist()
    order = np.lexsort((np.asarray(studies), days, np.asarray(patients)))  # patient, then date, then id
    table = table.take(order)
    patients, studies, days = [patients[i] for i in order], [studies[i] for i in order], days[order]
    cls, tokens = _tensor(table, "cls", np.float32), _tensor(table, "tokens", np.float32)
    unique, starts = np.unique(np.asarray(patients), return_index=True)
    offsets = np.concatenate([starts, [len(patients)]]).astype(np.int64)

    def column(name, default):
        return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows

    out = StudyTrajectories(
        dims=dims,
        patients=list(unique),
        offsets=offsets,
        studies=studies,
        days=days,
        tokens=np.concatenate([cls[:, None], tokens], axis=1),
        has_mask=np.asarray(column("has_mask", False), bool),
        lung_voxels=np.asarray([v or 0 for v in column("lung_voxels", 0)], np.int64),
        reports=[t or "" for t in column("report_text", "")],
    )
    if dims == 3 and ingested is not None:
        out.masks, out.mask_affine = _read_masks(Path(ingested), split, studies)
    return out


@dataclass
class Examples:
    """A batch of (priors, target) examples from trajectories; K = max_priors slots."""

    trajectory: np.ndarray  # (B,) index into the trajectories
    target_row: np.ndarray  # (B,) row of the target study
    prior_rows: np.ndarray  # (B, K) rows of the priors (-1 = padding), oldest first
    exam_mask: np.ndarray  # (B, K) bool
    days_before_target: np.ndarray  # (B, K) float32 (0 at padding)

    @property
    def last_prior_row(self) -> np.ndarray:
        """(B,) the most recent prior's row."""
        k = self.exam_mask.sum(axis=1) - 1
        return self.prior_rows[np.arange(len(k)), k]


def examples_for(
    trajectories: StudyTrajectories,
    picks: list[tuple[int, int]],
    max_priors: int,
    keep_priors: list[int | None] | None = None,
) -> Examples:
    """Examples for (trajectory, target exam position >= 1) pairs; the priors are the
    exams before the target, at most the `max_priors` (and `keep_priors[i]`, when given)
    most recent."""
    b = len(picks)
    prior_rows = np.full((b, max_priors), -1, np.int64)
    mask = np.zeros((b, max_priors), bool)
    before = np.zeros((b, max_priors), np.float32)
    target_rows = np.zeros(b, np.int64)
    for i, (traj, position) in enumerate(picks):
        rows = trajectories.rows_of(traj)
        if not 1 <= position < len(rows):
            raise ValueError(f"exam {position} of a {len(rows)}-exam trajectory has no prior to forecast it from")
        keep = min(position, max_priors)
        if keep_priors is not None and keep_priors[i] is not None:
            keep = min(keep, int(keep_priors[i]))
        priors = rows[position - keep : position]
        target_rows[i] = rows[position]
        prior_rows[i, :keep] = priors
        mask[i, :keep] = True
        before[i, :keep] = trajectories.days[rows[position]] - trajectories.days[priors]
    return Examples(np.asarray([p[0] for p in picks], np.int64), target_rows, prior_rows, mask, before)


def draw_examples(
    trajectories: StudyTrajectories,
    indices: np.ndarray,
    rng: np.random.Generator,
    max_priors: int,
    truncate: bool,
) -> Examples:
    """One example per trajectory in `indices`: a target exam drawn uniformly among its
    follow-ups, its priors (truncated to the k most recent, k uniform in 1..n, when
    `truncate`)."""
    n = trajectories.num_exams[indices]
    positions = rng.integers(1, n)  # a follow-up: 1..n-1
    keep = None
    if truncate:
        available = np.minimum(positions, max_priors)
        keep = list(rng.integers(1, available + 1))
    return examples_for(trajectories, list(zip(indices.tolist(), positions.tolist())), max_priors, keep)


def prior_tokens(trajectories: StudyTrajectories, examples: Examples) -> np.ndarray:
    """(B, K, 1 + N, dim) the priors' tokens, zeros at padding."""
    rows = np.where(examples.exam_mask, examples.prior_rows, 0)
    out = trajectories.tokens[rows]
    out[~examples.exam_mask] = 0.0
    return out


def epoch_batches(count: int, batch_size: int, rng: np.random.Generator, drop_last: bool = True):
    """Shuffled index batches over `count` items."""
    order = rng.permutation(count)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
