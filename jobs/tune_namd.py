"""Sweep NAMD with Ray Tune: a grid over lambda (CLDM Eq. 1's task-loss weight) and the
alignment temperatures tau_f, tau_z (NAMD Eq. 2) from `tune.grid`. The cohort is ingested
once; each distinct VAE setting gets one VAE, latent cache and unconditional LDM, shared
by its trials; each trial trains the conditional stage as a Ray Train run inside the
trial. Optional ASHA early stopping. Writes a summary table and the best configuration
as a ready-to-run train_namd config, all logged to MLflow. A rerun resumes the sweep.

Local:   python jobs/tune_namd.py --config jobs/configs/namd_debug.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
             python jobs/tune_namd.py --config jobs/configs/namd_nlst.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.job_entry import run_job
from cohortcast.tuning.sweep import format_sweep, run_sweep

if __name__ == "__main__":
    sys.exit(run_job(__doc__, run_sweep, format_sweep, "tune.asha.enabled=true"))
