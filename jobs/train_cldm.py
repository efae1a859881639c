"""Train CLDM part 1 end to end: cohort -> ingest -> universal encoder pre-training
(masked-image modelling on CT volumes and radiographs, Ray Train + DeepSpeed) -> study
latent cache, logged to MLflow. Stages with a valid output are skipped; an interrupted
stage resumes from its latest checkpoint.

Local:   python jobs/train_cldm.py --config jobs/configs/cldm_debug.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
             python jobs/train_cldm.py --config jobs/configs/cldm_debug.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.job_entry import run_job
from cohortcast.pipeline.cldm import format_report, run_cldm

if __name__ == "__main__":
    sys.exit(run_job(__doc__, run_cldm, format_report, "cldm.training.encoder.max_steps=100"))
