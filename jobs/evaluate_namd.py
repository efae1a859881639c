"""Evaluate NAMD as the paper's Table 1 does: a ViT malignancy evaluator trained on real
follow-ups judges real baselines, real follow-ups, NAMD forecasts, the ablation without
alignment and probe losses, and copy-the-baseline (AUROC/AUPRC mean ± std over seeds,
LPIPS, Frechet distance); plus prediction-variance figures. Writes a Markdown report and
logs it to MLflow. Trains what is missing (ablation, evaluator) and forecasts what is not
yet forecast; everything already valid is reused.

Local:   python jobs/evaluate_namd.py --config jobs/configs/namd_debug.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
             python jobs/evaluate_namd.py --config jobs/configs/namd_nlst.yaml [--set a.b=c ...]
"""

import sys

from cohortcast.evaluation.namd_evaluation import format_result, run_evaluation
from cohortcast.job_entry import run_job

if __name__ == "__main__":
    sys.exit(run_job(__doc__, run_evaluation, format_result, "forecast.num_samples=20"))
