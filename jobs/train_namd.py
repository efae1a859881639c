"""Train NAMD end to end: cohort -> ingest -> VAE -> latent cache -> unconditional LDM
-> conditional LDM -> Forecaster, logged to MLflow. Stages with a valid output are
skipped; an interrupted stage resumes from its latest checkpoint.

Local:   python jobs/train_namd.py --config jobs/configs/namd_debug.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
             python jobs/train_namd.py --config jobs/configs/namd_nlst.yaml [--set a.b=c ...]
"""

import argparse
import logging
import sys

from cohortcast.config import ConfigError, load_config
from cohortcast.data.manifest import ManifestError
from cohortcast.pipeline.namd import StageNotAvailable, format_report, run_namd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config, e.g. jobs/configs/namd_debug.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set training.ldm_cond.max_steps=100")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run_namd(load_config(args.config, args.overrides))
    except (ConfigError, ManifestError, StageNotAvailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
