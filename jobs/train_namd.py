"""Train NAMD end to end: cohort -> ingest -> VAE -> latent cache -> unconditional LDM
-> conditional LDM -> Forecaster, logged to MLflow. Stages with a valid output are
skipped; an interrupted stage resumes from its latest checkpoint.

Local:   python jobs/train_namd.py --config jobs/configs/namd_debug.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
             python jobs/train_namd.py --config jobs/configs/namd_nlst.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.job_entry import run_job
from cohortcast.pipeline.namd import format_report, run_namd

if __name__ == "__main__":
    sys.exit(run_job(__doc__, run_namd, format_report, "training.ldm_cond.max_steps=100"))
