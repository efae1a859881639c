"""Prepare a cohort: synthesise one if the config asks and none exists, then ingest it
with Ray Data into sharded Parquet. Runs locally or under `ray job submit`:

    python jobs/prepare_cohort.py --config jobs/configs/namd_debug.yaml [--set a.b=c ...]
"""

import argparse
import logging
import sys

from cohortcast.config import ConfigError, load_config
from cohortcast.data.manifest import ManifestError
from cohortcast.data.prepare import format_summary, prepare_cohort


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config, e.g. jobs/configs/namd_debug.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        card = prepare_cohort(cfg)
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
