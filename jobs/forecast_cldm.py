"""Forecast a cohort with a trained CLDM: every follow-up CT and radiograph of a split,
from the patient's earlier studies of the same kind, N seeded DDIM samples each,
written per case as Parquet (mask, volumes, per-sample spread, report) and NIfTI on the
study grid. Finished cases are skipped on rerun.

    python jobs/forecast_cldm.py --config jobs/configs/cldm_synthetic_eval.yaml \\
        [--set cldm.forecast.split=test --set cldm.forecast.kinds=[ct] ...]
"""

import json
import sys

from cohortcast.inference.cldm_cohort_forecast import forecast_cldm_cohort
from cohortcast.job_entry import run_job

if __name__ == "__main__":
    sys.exit(
        run_job(
            __doc__, forecast_cldm_cohort, lambda summary: json.dumps(summary, indent=2), "cldm.forecast.num_samples=4"
        )
    )
