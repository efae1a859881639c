"""Peak object-store use of a training stage as the cohort grows: the latents streamed
from Ray Data (what the stages do now, training/data_streaming.py) against the same
dataset materialised in the object store first (what they did before issue 17).

    python benchmarks/streaming_object_store.py [--rows 8000] [--growth 4] [--steps 250] [--store-mib 512] [--json out.json]

For each cohort size (`rows` and `rows x growth` latent-cache rows of 8 x 4 x 8 x 8
float32, 8 KiB each, in Parquet files of 100 rows) and each way of feeding it, stage c
(`ldm_unconditional_worker_loop`, the debug U-Net) trains `steps` steps on 2 workers x 1
CPU of a 2-CPU Ray instance (the workers fill it: the case that once deadlocked), while
a thread polls the object store's used bytes (the raylet's store stats) every 0.02 s
(the peak above what the store held before the run, in a fresh Ray instance per run).
The same training run (same steps) on both cohorts. Ray Data reads ahead of the
workers up to its share of the object store, so the store is made small (`--store-mib`)
for the cohorts to outgrow that share on this machine, as a real cohort outgrows a
real store. Record the
output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROWS_PER_FILE = 100
LATENT = (8, 4, 8, 8)  # 8 orientations x the debug VAE's 4 x 8 x 8 latent


def object_store_bytes() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this instance, not another
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


class PeakSampler:
    """Polls the object store's used bytes in a thread; `peak` is the highest seen."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, object_store_bytes())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_cache(folder: Path, rows: int) -> Path:
    """A latent cache's train split: `rows` random latents in files of ROWS_PER_FILE."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    split = folder / "nodules" / "split=train"
    split.mkdir(parents=True)
    rng = np.random.default_rng(rows)
    for start in range(0, rows, ROWS_PER_FILE):
        latents = rng.standard_normal((min(ROWS_PER_FILE, rows - start), *LATENT)).astype(np.float32)
        table = pa.table({"latent_d8": ArrowTensorArray.from_numpy(latents)})  # the cache's tensor column
        pq.write_table(table, split / f"part-{start // ROWS_PER_FILE:05d}.parquet")
    return folder


def train(dataset, steps: int, storage: str) -> dict:
    from cohortcast.config.models import ForecasterConfig
    from cohortcast.config.training import ScalingSettings, StageConfig
    from cohortcast.training.ldm_stage import ldm_unconditional_worker_loop
    from cohortcast.training.runner import run_stage

    stage = StageConfig(
        max_steps=steps, micro_batch_size=8, lr=1e-4, warmup_steps=1, checkpoint_every=10**6, log_every=steps
    )
    started = time.perf_counter()
    result = run_stage(
        f"stream-bench-{time.time_ns()}",
        ldm_unconditional_worker_loop,
        {"stage": stage, "model": ForecasterConfig()},
        {"train": dataset},
        ScalingSettings(num_workers=2, cpus_per_worker=1.0, storage_path=storage, max_failures=0),
    )
    return {"seconds": time.perf_counter() - started, "samples_per_s": float(result.metrics["samples_per_s"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8000, help="latent-cache rows of the smaller cohort")
    parser.add_argument(
        "--store-mib", type=int, default=512, help="object store size (Ray Data reads ahead up to a share of it)"
    )
    parser.add_argument("--growth", type=int, default=4, help="the larger cohort is this many times the smaller")
    parser.add_argument(
        "--steps", type=int, default=250, help="training steps per run (default: one pass of the larger)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import ray

    from cohortcast.training.ldm_stage import latent_dataset

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (args.rows, args.rows * args.growth):
            cache = write_cache(Path(tmp) / f"cache-{rows}", rows)
            for mode in ("streamed", "materialised"):
                # A fresh Ray instance per run: a materialised dataset's blocks can outlive
                # the run (Ray Train keeps a reference), and a baseline holding them would
                # hide the next run's use as they are freed.
                gc.collect()
                ray.init(
                    address="local",
                    num_cpus=2,
                    object_store_memory=args.store_mib * 2**20,
                    include_dashboard=False,
                    log_to_driver=False,
                )
                baseline = object_store_bytes()
                with PeakSampler() as sampler:
                    dataset = latent_dataset(cache, "train")
                    if mode == "materialised":
                        dataset = dataset.materialize()
                    figures = train(dataset, args.steps, str(Path(tmp) / "ray_results"))
                del dataset
                ray.shutdown()
                row = {
                    "rows": rows,
                    "dataset_mib": rows * int(np.prod(LATENT)) * 4 / 2**20,
                    "mode": mode,
                    "baseline_object_store_mib": baseline / 2**20,
                    "peak_object_store_mib": (sampler.peak - baseline) / 2**20,
                    "polls": sampler.samples,
                    **figures,
                }
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, Ray {ray.__version__}; "
        f"2 workers x 1 CPU on a 2-CPU Ray instance, {args.store_mib} MiB object store, "
        f"{args.steps} steps of micro-batch 8"
    )
    print(f"\n{machine}")
    print(f"{'rows':>6} {'dataset MiB':>12} {'mode':<13} {'peak object store MiB':>22} {'s':>6}")
    for r in rows_out:
        print(
            f"{r['rows']:>6} {r['dataset_mib']:>12.1f} {r['mode']:<13} {r['peak_object_store_mib']:>22.1f}"
            f" {r['seconds']:>6.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": rows_out}, indent=1))


if __name__ == "__main__":
    main()
