"""What every `jobs/*.py` entry shares: `--config FILE` + repeated `--set a.b=c`,
logging, and user errors (any CohortcastError: bad config, manifest, missing input) as
one line on stderr with exit status 2 instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from cohortcast.errors import USER_ERRORS


def run_job(
    doc: str, job: Callable[[Any], Any], show: Callable[[Any], str], example: str, defaults: tuple[str, ...] = ()
) -> int:
    """Parse the command line, run `job(config)`, print `show(result)`; returns the exit
    status. `defaults`: overrides applied before the command line's own (`tune.job=cldm`)."""
    from cohortcast.config import load_config
    from cohortcast.console import configure_logging

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="YAML config, e.g. jobs/configs/namd_debug.yaml"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config value (repeatable), e.g. --set {example}",
    )
    args = parser.parse_args()
    configure_logging()
    try:
        result = job(load_config(args.config, [*defaults, *args.overrides]))
    except USER_ERRORS as exc:  # CohortcastError and missing/existing paths (see cohortcast.errors)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(show(result))
    return 0
