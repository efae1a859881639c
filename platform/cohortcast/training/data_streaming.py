"""Training data streamed from Ray Data while the workers train, instead of materialised
in the object store first.

Why a reservation: a stage's Train workers hold their CPUs for the whole run, and a
lazy dataset's read/decode tasks need CPUs too. On a machine the workers fill (2 CPUs,
2 workers x 1 CPU) those tasks would wait for a CPU forever: the deadlock that once made
every stage materialise its dataset. Instead, `ScalingSettings.data_cpus` CPUs of the
cluster stay free for Ray Data: every streaming task asks for a share of them
(`data_task_cpus`), and when the workers' CPUs would leave less than that free on a
cluster they would otherwise just fill, each worker asks for a little less
(`worker_cpus`; its torch threads are the CPUs rounded up, so 0.75 of a CPU is still
one thread). Ray Data's own budget is limited to the same free CPUs
(`data_execution_options`), so it does not queue more tasks than can run.

Peak object-store use is then a few blocks in flight per worker, whatever the cohort's
size (measured in benchmarks/RESULTS.md, "Streaming training data").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from cohortcast.config.training import ScalingSettings

log = logging.getLogger(__name__)


def data_task_cpus(data_cpus: float) -> float:
    """CPUs one streaming read/decode task asks for: half the reservation (two stream at
    once on the smallest machine), at most one CPU (a normal Ray Data task on a cluster)."""
    return min(1.0, data_cpus / 2)


def worker_cpus(scaling: ScalingSettings, cluster_cpus: float) -> float:
    """The CPUs each Train worker asks for. `cpus_per_worker` unless the workers would fill
    the cluster so that less than `data_cpus` stays free: then shrunk just enough (never
    below a quarter of a CPU). A request larger than the cluster is left alone: an
    autoscaler may be adding nodes, and shrinking it would hide that it does not fit."""
    wanted = scaling.num_workers * scaling.cpus_per_worker
    if scaling.data_cpus <= 0 or wanted > cluster_cpus or cluster_cpus - wanted >= scaling.data_cpus:
        return scaling.cpus_per_worker
    shrunk = max(0.25, (cluster_cpus - scaling.data_cpus) / scaling.num_workers)
    log.info(
        "%d worker(s) x %g CPU would leave %.2g of the cluster's %g CPUs to Ray Data "
        "(training.scaling.data_cpus = %g): each worker asks for %.3g CPU instead",
        scaling.num_workers,
        scaling.cpus_per_worker,
        cluster_cpus - wanted,
        cluster_cpus,
        scaling.data_cpus,
        shrunk,
    )
    return shrunk


def torch_threads(assigned_cpus: float) -> int:
    """Intra-op threads for a worker holding `assigned_cpus` (possibly fractional)."""
    return max(1, math.ceil(assigned_cpus - 1e-9))


def data_execution_options(scaling: ScalingSettings, cluster_cpus: float, per_worker: float):
    """Ray Data's options for a stage's datasets: its CPU budget is what the workers
    leave free (at least the reservation)."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.data.context import DataContext

    free = max(scaling.data_cpus, cluster_cpus - scaling.num_workers * per_worker)
    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=ExecutionResources(cpu=free),
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


def stream_parquet(
    folder: str | Path,
    columns: list[str] | None,
    data_cpus: float,
    row_filter=None,
    rename: dict[str, str] | None = None,
):
    """A lazy Ray Dataset over a Parquet folder: one block per file, each read by a task
    that asks for `data_task_cpus(data_cpus)`; `columns`, `row_filter` (a pyarrow
    expression, e.g. `pyarrow.dataset.field("dims") == 3`) and `rename` ({old: new}
    column names) are applied while reading, in that task (a separate projection step
    would be a task of its own asking for a whole CPU).

    Not `ray.data.read_parquet`: since Ray 2.5x it lists files in a task of its own that
    always asks for a whole CPU, which a full cluster never grants (the deadlock again).
    The files are listed here, on the driver, before any worker holds a CPU."""
    import ray.data

    files = sorted(str(p) for p in Path(folder).rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder}: no Parquet file to stream")
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_parquet_files,
        fn_kwargs={"columns": columns, "row_filter": row_filter, "rename": rename or {}},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=data_task_cpus(data_cpus),
    )


def _read_parquet_files(batch, columns: list[str] | None, row_filter, rename: dict[str, str]):
    import pyarrow as pa
    import pyarrow.dataset as pads

    tables = [
        pads.dataset(path, format="parquet").to_table(columns=columns, filter=row_filter)
        for path in batch.column("path").to_pylist()
    ]
    table = pa.concat_tables(tables)
    return table.rename_columns([rename.get(name, name) for name in table.column_names])
