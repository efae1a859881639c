"""Forecast a cohort with a trained Forecaster: every (patient, nodule) of a split with a
follow-up, N seeded DDIM samples each, written per case as Parquet, NIfTI and a DICOM
series on the source geometry. Finished cases are skipped on rerun.

    python jobs/forecast_cohort.py --config jobs/configs/namd_debug.yaml \\
        [--set forecast.split=test --set forecast.num_samples=20 ...]
"""

import json
import sys

from cohortcast.inference.cohort_forecast import forecast_cohort
from cohortcast.job_entry import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, forecast_cohort, lambda summary: json.dumps(summary, indent=2), "forecast.num_samples=4"))
