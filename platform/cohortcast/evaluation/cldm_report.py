"""The CLDM evaluation's report folder: report.md (both tables, the claims, the choices
and the paper's ambiguities), tables.json and targets.csv (pseudonymous case ids), written
to a temporary folder and renamed into place."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from cohortcast.evaluation.cldm_tables import Table1, Table2, format_claims

CHOICES = [
    "**Targets**: on the split, every follow-up exam (position >= 1) forecast from all its priors (the most "
    "recent `temporal.max_exams`). Table 1 keeps CT targets whose study and last prior have an ILD mask "
    "(fibrosis patients) and whose lung mask is known; Table 2 every radiograph follow-up with a report.",
    "**1 / 3-prior rows are truncated context**, not retrained models: the same trained CLDM sees only the k "
    "most recent priors (all of them where fewer exist). Training truncates the priors at random "
    "(k uniform in 1..n), so these contexts are in distribution.",
    '**Table 1\'s two identical no-diffusion rows** ("No Diffusion (Deterministic)" and "Ours (without '
    'diffusion, all Scans)", both 0.27 / 1.89) are read as one model: one row here, the regressor (the '
    'forecaster\'s networks run once, trained with MSE; README, "No-diffusion baseline").',
    "**aVD's lung volume** is the target study's `lung_voxels` (its lung mask resampled to the ingested "
    "evaluation grid), the three volumes counted on that grid, so the aVD is a fraction of the lung. The "
    "paper's 0.30-1.89 cannot be fractions of the lung; its normalisation is unstated.",
    "**Mean forecast**: the mean of the S sample probabilities, >= 0.5. Per-sample columns: sample k of "
    "every target is seed run k, mean ± std over the seeds. Deterministic rows have one sample (std 0).",
    "**Progression Dice** is undefined (left out, counted as n) where neither the forecast nor the truth "
    "has voxels new since the last prior; copy-last scores 0 wherever it is defined.",
    "**Text decoder**: the paper decodes reports with a diffusion-based text decoder (Sec. 4.2) while its "
    "Sec. 3 describes BioGPT decoding autoregressively; here an autoregressive causal LM (BioGPT-style, a "
    "tiny GPT-2 in tests) conditioned by prefix vectors pooled from the forecast tokens (and the last "
    "prior's, for +prior rows), greedy or beam decoding.",
    "**Label F1**: CheXpert labels of both reports by one labeler; uncertain mapped by the policy shown; "
    "the micro F1 over all (report, label) decisions. Change-label F1: improved / stable / worse against "
    "the prior from the rule labeler's cues, macro over the three. BLEU-4 is corpus BLEU (sacrebleu, 13a).",
    "**CIs**: patient-level bootstrap 95% percentile intervals (all of a patient's targets resampled "
    "together); paired differences on the same resamples.",
]


def report_markdown(result) -> str:
    c = result.cohort
    lines = [
        f"# CLDM evaluation ({c['split']} split)",
        "",
        f"{c['num_samples']} DDIM samples per target, {c['inference_steps']} steps, seed {c['seed']}, "
        f"{c['bootstrap']} bootstrap resamples.",
        "",
    ]
    if result.table1 is not None:
        t = result.table1
        lines += [
            "## Table 1: ILD mask of the forecast CT study",
            "",
            f"{t.targets} targets from {t.patients} patients; left out: {_skipped(c.get('skipped_ct', {}))}.",
            "",
            t.markdown(),
            "",
            *[f"- {m}: {n}" for m, n in t.notes.items()],
            "",
        ]
    if result.table2 is not None:
        t = result.table2
        lines += [
            "## Table 2: report of the forecast radiograph",
            "",
            f"{t.targets} targets from {t.patients} patients; left out: {_skipped(c.get('skipped_dx', {}))}; "
            f"labeler {t.labeler}, uncertain -> {t.uncertain}.",
            "",
            t.markdown(),
            "",
            *[f"- {r.method}: {r.note}" for r in t.rows if r.note],
            "",
        ]
    lines += ["## The paper's claims", "", *format_claims(result.claims), "", "## Choices and ambiguities", ""]
    lines += [f"- {x}" for x in CHOICES]
    return "\n".join(lines) + "\n"


def _skipped(skipped: dict[str, int]) -> str:
    parts = [f"{v} ({k})" for k, v in skipped.items() if v]
    return ", ".join(parts) or "none"


def _json(table) -> dict | None:
    if table is None:
        return None

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {k: convert(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if hasattr(value, "tolist"):
            return value.tolist()
        return value

    return convert(table)


def write_report(folder: str | Path, result) -> Path:
    from cohortcast.io.atomic import atomic_folder

    folder = Path(folder)
    with atomic_folder(folder, overwrite=True) as tmp:
        (tmp / "report.md").write_text(report_markdown(result))
        payload = {
            "cohort": result.cohort,
            "table1": _json(result.table1),
            "table2": _json(result.table2),
            "claims": [dataclasses.asdict(x) for x in result.claims],
        }
        (tmp / "tables.json").write_text(json.dumps(payload, indent=2, default=str))
        if result.table1 is not None:
            _targets_csv(tmp / "targets.csv", result.table1, result.cohort["ct_cases"], result.cohort["ct_priors"])
    return folder / "report.md"


def _targets_csv(path: Path, table: Table1, case_ids: list[str], priors: list[int]) -> None:
    fields = ["case_id", "priors"] + [f"{r.method} {m}" for r in table.rows for m in ("dice", "avd")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for i, (case, k) in enumerate(zip(case_ids, priors)):
            values = [f"{r.per_case[m][i]:.6g}" for r in table.rows for m in ("dice", "avd")]
            writer.writerow([case, k, *values])


def table_metrics(table1: Table1 | None, table2: Table2 | None) -> dict[str, float]:
    """Every table value as an MLflow metric key (`t1/<method>/<metric>...`)."""
    from cohortcast.evaluation.cldm_scoring import _slug

    out: dict[str, float] = {}
    for r in table1.rows if table1 else []:
        s = f"t1/{_slug(r.method)}"
        for m, v in r.mean_forecast.items():
            if v == v:
                out[f"{s}/{m}"] = v
            if r.ci.get(m) is not None:
                out[f"{s}/{m}_ci_low"], out[f"{s}/{m}_ci_high"] = r.ci[m].low, r.ci[m].high
            out[f"{s}/{m}_per_sample_mean"], out[f"{s}/{m}_per_sample_std"] = r.per_seed[m].mean, r.per_seed[m].std
    if table1 and table1.difference:
        d = table1.difference
        out["t1/avd_cldm_all_minus_copy_last"] = d.mean
        out["t1/avd_cldm_all_minus_copy_last_ci_low"] = d.interval.low
        out["t1/avd_cldm_all_minus_copy_last_ci_high"] = d.interval.high
    for r in table2.rows if table2 else []:
        s = f"t2/{_slug(r.method)}"
        for m, v in r.values.items():
            if v is not None:
                out[f"{s}/{m}"] = v
            if r.ci.get(m) is not None:
                out[f"{s}/{m}_ci_low"], out[f"{s}/{m}_ci_high"] = r.ci[m].low, r.ci[m].high
    return {k: float(v) for k, v in out.items() if v == v}
