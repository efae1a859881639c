"""The report decoder's LM folder: `cldm.models.report.lm_path` when set (a local BioGPT-
style model), else, with `cldm.training.tiny_lm.write_if_missing` (debug configs; there
is no model hub here), a tiny randomly initialised GPT-2 written once to
`<cldm.training.output>/tiny_lm`, its word-level vocabulary taken from the training
split's reports so the tokenizer knows their words."""

from __future__ import annotations

import logging
from pathlib import Path

from cohortcast.config.schema import CohortcastConfig
from cohortcast.errors import MissingInputError

log = logging.getLogger(__name__)

TINY_LM_FOLDER = "tiny_lm"
# Words every report vocabulary gets besides the cohort's (so a val/test report is not all
# <unk> when the training split's reports are few): CheXpert-style findings.
FALLBACK_CORPUS = (
    "FINDINGS: Comparison is made with the prior study. Normal heart size. No pleural effusion or pneumothorax. "
    "No focal consolidation. Mild, moderate or severe bibasilar reticular opacities are new, unchanged, improved "
    "or worse.\nIMPRESSION: No acute cardiopulmonary process. Stable findings.",
)


def training_reports(source: str | Path) -> list[str]:
    """The train split's radiograph reports, from a study latent cache folder
    (studies/dims=2/split=train) or an ingested folder (studies/split=train, dims 2)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    source = Path(source)
    cached = source / "studies" / "dims=2" / "split=train"
    ingested = source / "studies" / "split=train"
    if cached.is_dir():
        table = pads.dataset(str(cached), format="parquet").to_table(columns=["report_text"])
    elif ingested.is_dir():
        ds = pads.dataset(str(ingested), format="parquet")
        table = ds.to_table(columns=["report_text"], filter=pc.field("dims") == 2)
    else:
        raise MissingInputError(f"{source}: neither a study latent cache nor an ingested folder with a train split")
    return [t for t in table.column("report_text").to_pylist() if t]


def ensure_report_lm(cfg: CohortcastConfig, reports_source: str | Path) -> str:
    """The LM folder the report decoder loads: the configured `lm_path`, or the tiny
    debug GPT-2 (written atomically on first use, reused after). `reports_source`: the
    study latent cache or the ingested folder (its train split's reports)."""
    configured = cfg.cldm.models.report.lm_path
    tiny = cfg.cldm.training.tiny_lm
    if configured is not None:
        if not Path(configured).is_dir():
            raise MissingInputError(f"cldm.models.report.lm_path: {configured} is not a folder")
        return str(configured)
    if not tiny.write_if_missing:
        raise MissingInputError(
            "cldm.models.report.lm_path is not set: the report stage needs a local causal LM folder "
            "(or cldm.training.tiny_lm.write_if_missing: true for a tiny debug GPT-2)"
        )
    folder = Path(cfg.cldm.training.output) / TINY_LM_FOLDER
    if (folder / "config.json").is_file():
        return str(folder)
    from cohortcast.io.atomic import atomic_folder
    from cohortcast.models.tiny_llm import write_tiny_gpt2

    corpus = [*training_reports(reports_source), *FALLBACK_CORPUS]
    log.info(
        "writing a tiny random GPT-2 (%d wide, %d layers) to %s (cldm.training.tiny_lm.write_if_missing; debug only)",
        tiny.hidden_size,
        tiny.layers,
        folder,
    )
    # overwrite: a folder without config.json is a leftover, never a usable model
    with atomic_folder(folder, overwrite=True) as tmp:
        write_tiny_gpt2(tmp, corpus, hidden_size=tiny.hidden_size, layers=tiny.layers)
    return str(folder)
