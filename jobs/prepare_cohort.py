"""Prepare a cohort: synthesise one if the config asks and none exists, then ingest it
with Ray Data into sharded Parquet. Runs locally or under `ray job submit`:

    python jobs/prepare_cohort.py --config jobs/configs/namd_debug.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.data.prepare import format_summary, prepare_cohort
from cohortcast.job_entry import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, prepare_cohort, format_summary, "synth.patients=40"))
