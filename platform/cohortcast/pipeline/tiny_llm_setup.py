"""Debug configs condition on a tiny randomly initialised Gemma 3 (no model hub here):
written once at `model.conditioner.llm_path`, its vocabulary taken from the cohort's own
EHR prompts so the tokenizer knows their words."""

from __future__ import annotations

import logging
from pathlib import Path

from cohortcast.config.schema import CohortcastConfig

log = logging.getLogger(__name__)


def ensure_debug_llm(cfg: CohortcastConfig, card: dict) -> None:
    path = cfg.model.conditioner.llm_path
    if not path or Path(path).exists() or not cfg.training.tiny_llm_if_missing:
        return
    import pyarrow.parquet as pq

    from cohortcast.data.manifest import EHR_FEATURES
    from cohortcast.io.atomic import atomic_folder
    from cohortcast.models.ehr_prompt import render_ehr_prompt
    from cohortcast.models.tiny_llm import write_tiny_gemma3

    rows = pq.read_table(Path(card["config"]["output"]) / "nodules", columns=list(EHR_FEATURES)).to_pylist()
    corpus = [render_ehr_prompt(r) for r in rows] or [render_ehr_prompt({})]
    log.info("writing a tiny random Gemma 3 to %s (training.tiny_llm_if_missing; debug only)", path)
    with atomic_folder(path) as tmp:  # never a half-written model folder
        write_tiny_gemma3(tmp, corpus)
