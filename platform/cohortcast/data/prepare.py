"""The cohort-preparation stage: synthesise a cohort if asked and none exists, then
ingest it. What `make demo` runs until training exists."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cohortcast.config import CohortcastConfig
from cohortcast.data.ingest import run_ingest
from cohortcast.data.synthetic import generate_cohort
from cohortcast.errors import MissingInputError

log = logging.getLogger(__name__)


def prepare_cohort(cfg: CohortcastConfig) -> dict[str, Any]:
    manifest = Path(cfg.ingest.manifest)
    if not manifest.exists():
        if not cfg.synthesize_if_missing:
            raise MissingInputError(
                f"manifest folder {manifest} does not exist (set synthesize_if_missing "
                "to generate a synthetic cohort there)"
            )
        # One process per CPU the job may use (the output does not depend on it): 1000
        # patients took 312 s in one process on 2 cores.
        workers = max(1, min(cfg.ray.num_cpus or os.cpu_count() or 1, cfg.synth.patients))
        log.info(
            "no manifest at %s: generating a synthetic cohort of %d patients (%d processes)",
            manifest,
            cfg.synth.patients,
            workers,
        )
        generate_cohort(cfg.synth, manifest, workers=workers)
    return run_ingest(cfg.ingest, cfg.privacy, cfg.ray)


def _findings_line(c: dict[str, Any]) -> str:
    """findings = cropped + with their quarantined study + quarantined themselves.
    Cards written before these counts existed lack the first two: say so, do not guess."""
    if "findings_cropped" not in c:
        return f"  findings {c['findings']}: {c['findings_quarantined']} quarantined (older card: no breakdown)"
    return (
        f"  findings {c['findings']}: {c['findings_cropped']} cropped, "
        f"{c['findings_with_quarantined_study']} with their quarantined study, "
        f"{c['findings_quarantined']} quarantined themselves"
    )


def _shapes_line(card: dict[str, Any]) -> str:
    studies = card["tables"]["studies"]
    line = f"  crop {card['tables']['nodules']['crop']}, patch {card['tables']['nodules']['patch']}, "
    line += f"volume {studies['volume']}"
    if "radiograph" in studies:  # cards from before radiographs were ingested lack it
        line += f", radiograph {studies['radiograph']}"
    return line


def format_summary(card: dict[str, Any]) -> str:
    c = card["counts"]
    lines = [
        f"ingestion {'reused (up to date)' if card.get('reused') else 'complete'}: {card['config']['output']}",
        f"  patients {c['patients']}, studies {c['studies']}: {c['studies_ingested']} ingested, "
        f"{c['studies_quarantined']} quarantined",
        _findings_line(c),
        "  nodule rows by split: " + ", ".join(f"{k} {v}" for k, v in c["nodule_rows"].items()),
        "  study rows by split:  " + ", ".join(f"{k} {v}" for k, v in c["study_rows"].items()),
    ]
    if "study_dims" in c:
        lines.append(
            f"  study rows by kind:   {c['study_dims']['volumes']} volumes, {c['study_dims']['radiographs']} radiographs"
        )
    lines.append(_shapes_line(card))
    if card.get("quarantine_reasons"):
        lines.append("  quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in card["quarantine_reasons"].items()))
    lines.append(f"  manifest {card['manifest_fingerprint'][:12]}, output fingerprint {card['fingerprint'][:12]}")
    return "\n".join(lines)
