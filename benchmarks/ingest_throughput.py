"""Ingestion throughput: Ray Data pipeline vs a plain single-process loop, same cohort,
same per-study work (cohortcast.data.study_processing.process_study), both writing
Parquet, measured side by side in one run.

    python benchmarks/ingest_throughput.py [--patients 40] [--repeats 2] [--workdir /tmp/cc-bench]
        [--no-antialias]   # resample volumes/radiographs without the Gaussian prefilter

Prints studies/s and crops/s for both and the ratio. Not a test: record the figures
and the machine in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _arrow_table(rows: list[dict]) -> pa.Table:
    tensors = [k for k, v in rows[0].items() if isinstance(v, np.ndarray)]
    table = pa.table({k: [r[k] for r in rows] for k in rows[0] if k not in tensors})
    for name in tensors:
        table = table.append_column(
            name, pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack([r[name] for r in rows]))
        )
    return table


def plain_loop(cfg, privacy) -> tuple[int, int]:
    """The same per-study work and the same two tables, in one process, no Ray."""
    from cohortcast.data.ingest import build_tasks, explode_nodules, study_row
    from cohortcast.data.manifest import load_manifest
    from cohortcast.data.privacy import Pseudonymizer
    from cohortcast.data.study_processing import OK, process_study

    manifest = load_manifest(cfg.manifest)
    tasks = build_tasks(manifest, Pseudonymizer.from_config(privacy), cfg)
    nodules, studies = [], []
    for task in tasks:
        result = process_study(task, cfg)
        nodules.extend(explode_nodules(result))
        if result["status"] == OK:
            studies.append(study_row(result))
    out = Path(cfg.output)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, rows in (("nodules", nodules), ("studies", studies)):
        if rows:
            pq.write_to_dataset(_arrow_table(rows), out / name, partition_cols=["split"])
    return len(tasks), len(nodules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=40, help="synthetic patients in the benchmark cohort")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each path (best is reported)")
    parser.add_argument("--workdir", default="/tmp/cohortcast-bench", help="scratch folder (cohort + outputs)")
    parser.add_argument(
        "--antialias",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ingest.antialias: Gaussian prefilter before shrinking whole studies (default on)",
    )
    args = parser.parse_args()

    import ray

    from cohortcast.config import IngestConfig, PrivacyConfig, SynthConfig
    from cohortcast.data.ingest import run_ingest
    from cohortcast.data.synthetic import generate_cohort

    os.environ.setdefault("COHORTCAST_PSEUDONYM_SECRET", "benchmark")
    work = Path(args.workdir)
    cohort = work / f"cohort-{args.patients}"
    if not cohort.exists():
        generate_cohort(SynthConfig(patients=args.patients, seed=1), cohort, workers=os.cpu_count() or 1)
    cfg = IngestConfig(
        manifest=str(cohort),
        output=str(work / "ray-out"),
        crop_size=64,
        crop_spacing_mm=0.75,
        patch_size=32,
        patch_spacing_mm=1.0,
        volume_shape=(32, 64, 64),
        antialias=args.antialias,
        overwrite=True,
    )
    privacy = PrivacyConfig()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    run_ingest(cfg, privacy)  # warm-up: worker start-up and imports are not throughput
    timings = {"ray": [], "plain": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        card = run_ingest(cfg, privacy)
        timings["ray"].append(time.perf_counter() - t)
        t = time.perf_counter()
        studies, crops = plain_loop(IngestConfig(**{**cfg.__dict__, "output": str(work / "plain-out")}), privacy)
        timings["plain"].append(time.perf_counter() - t)
    ray_crops = sum(card["counts"]["nodule_rows"].values())
    assert ray_crops == crops, (ray_crops, crops)
    # Both paths do the same per-study work (crops, patches, volume resampling) and write
    # the same two tables; Ray also writes the quarantine table and the card.
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, Ray {ray.__version__}"
    )
    print(
        f"cohort: {args.patients} patients, {studies} studies, {crops} crops; best of {args.repeats}; "
        f"antialias {'on' if args.antialias else 'off'}"
    )
    best = {k: min(v) for k, v in timings.items()}
    for name in ("plain", "ray"):
        print(
            f"{name:>5}: {best[name]:7.2f} s  {studies / best[name]:7.2f} studies/s  {crops / best[name]:7.2f} crops/s"
        )
    print(f"ratio ray/plain (throughput): {best['plain'] / best['ray']:.2f}x")


if __name__ == "__main__":
    main()
