"""Forecast a cohort with a trained Forecaster: every (patient, nodule) of a split with a
follow-up, N seeded DDIM samples each, written per case as Parquet, NIfTI and a DICOM
series on the source geometry. Finished cases are skipped on rerun.

    python jobs/forecast_cohort.py --config jobs/configs/namd_debug.yaml \\
        [--set forecast.split=test --set forecast.num_samples=20 ...]
"""

import argparse
import json
import logging
import sys

from cohortcast.config import ConfigError, load_config
from cohortcast.config.paths import resolve_paths
from cohortcast.inference.cohort_forecast import run_cohort_forecast
from cohortcast.models.errors import ForecasterLoadError
from cohortcast.ray_runtime import ensure_ray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config (its `forecast` section)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set forecast.num_samples=4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = resolve_paths(load_config(args.config, args.overrides))
        ensure_ray(cfg.ray)
        summary = run_cohort_forecast(cfg.forecast, llm_path=cfg.model.conditioner.llm_path)
    except (ConfigError, ForecasterLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
