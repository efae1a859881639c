"""Evaluate the CLDM as the paper's Tables 1-2 do: on `cldm.evaluation.split`, the ILD mask
of each forecast CT study (copy-last, no-diffusion, CLDM with 1 / 3 / all priors, the
current-exam bound: Dice, aVD, progression Dice, HD95 with patient-bootstrap CIs) and the
report of each forecast radiograph (copy-prior, CLDM with and without the prior exam,
no-diffusion, the current-exam bound: BLEU-4, ROUGE-L, CheXpert and change-label F1); the
paper's claims checked; a Markdown report, logged to MLflow. Trains what the CLDM job has
not trained yet (stages up to date are skipped).

Local:   python jobs/evaluate_cldm.py --config jobs/configs/cldm_debug.yaml
Cluster: cluster/local_job.sh jobs/evaluate_cldm.py --config jobs/configs/cldm_debug.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.evaluation.cldm_evaluation import format_result, run_cldm_evaluation
from cohortcast.job_entry import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, run_cldm_evaluation, format_result, "cldm.evaluation.max_targets=40"))
