"""Cohort forecasting throughput end to end (Ray Data actor pool -> per-case Parquet,
NIfTI, DICOM) and its scaling with the number of actors, in one run.

    python benchmarks/cohort_forecast_throughput.py [--patients 24] [--samples 8] [--steps 20]

A synthetic cohort is generated and ingested once (all patients in one split), a tiny
random Forecaster (the debug config's sizes) is saved, then the whole split is
forecast from scratch with 1, 2, ... actors (each actor reserves an equal share of the
CPUs left after one for the feeding tasks). Record the output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("COHORTCAST_PSEUDONYM_SECRET", "benchmark")
    import ray
    import torch

    from cohortcast.config import IngestConfig, SplitConfig, SynthConfig
    from cohortcast.config.models import DenoiserConfig, ForecasterConfig, SchedulerConfig, VAEConfig
    from cohortcast.config.training import ForecastJobConfig
    from cohortcast.data.ingest import run_ingest
    from cohortcast.data.synthetic import generate_cohort
    from cohortcast.inference.cohort_forecast import run_cohort_forecast
    from cohortcast.models.forecaster import Forecaster

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_cohort(
            SynthConfig(
                patients=args.patients,
                seed=3,
                image_size=64,
                num_slices=32,
                pixel_spacing_mm=5.0,
                slice_thickness_mm=6.0,
            ),
            root / "cohort",
            progress=False,
        )
        run_ingest(
            IngestConfig(
                manifest=str(root / "cohort"),
                output=str(root / "ingested"),
                crop_size=32,
                crop_spacing_mm=1.5,
                patch_size=8,
                volume_shape=(8, 16, 16),
                split=SplitConfig(0.0, 0.0, 1.0),
            )
        )
        torch.manual_seed(0)
        Forecaster(
            ForecasterConfig(
                scheduler=SchedulerConfig(micro_batch=args.samples),
                vae=VAEConfig(scaling_factor=1.0),
                denoiser=DenoiserConfig(change_scale=1.0),
            )
        ).save(root / "model")
        rows = []
        for actors in args.actors:
            job = ForecastJobConfig(
                forecaster=str(root / "model"),
                ingested=str(root / "ingested"),
                split="test",
                output=str(root / f"out-{actors}"),
                num_samples=args.samples,
                inference_steps=args.steps,
                actors=actors,
                cases_per_batch=2,
            )
            started = time.perf_counter()
            summary = run_cohort_forecast(job)
            rows.append((actors, summary, time.perf_counter() - started))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, Ray {ray.__version__}; {args.samples} samples x {args.steps} DDIM steps per case"
    )
    print(f"{'actors':>6} {'cases':>6} {'wall s':>8} {'cases/s':>8} {'samples/s':>10} {'vs 1 actor':>10}")
    base = rows[0][1]["cases_per_s"]
    for actors, s, wall in rows:
        print(
            f"{actors:>6} {s['forecast_this_run']:>6} {wall:>8.1f} {s['cases_per_s']:>8.2f} {s['samples_per_s']:>10.1f} "
            f"{s['cases_per_s'] / base:>9.2f}x"
        )


if __name__ == "__main__":
    main()
