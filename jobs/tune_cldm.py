"""Sweep CLDM with Ray Tune: a grid over lambda (CLDM Eq. 1's task-loss weight,
`cldm.training.diffusion.task_weight`, default {0, 0.1, 0.5, 1, 2}) from `tune.grid`,
selected on validation aVD (`tune.metric`, default val/best_avd: the val aVD of the
weights each trial's diffusion stage keeps). The cohort is ingested once; the encoder,
study latent cache and segmentation / report decoders are trained once per distinct
upstream and shared; each trial trains the diffusion stage as a Ray Train run inside the
trial. Writes a summary table and the best configuration as a ready-to-run train_cldm
config, all logged to MLflow. A rerun resumes the sweep. The same as
`cohortcast tune --job cldm` (this script sets tune.job=cldm).

Local:   python jobs/tune_cldm.py --config jobs/configs/cldm_debug.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
             python jobs/tune_cldm.py --config jobs/configs/cldm_debug.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.job_entry import run_job
from cohortcast.tuning.sweep import format_sweep, run_sweep

if __name__ == "__main__":
    sys.exit(run_job(__doc__, run_sweep, format_sweep, "tune.max_concurrent_trials=1", defaults=("tune.job=cldm",)))
