"""The evaluation report: a Markdown file with the Table-1-shaped table, the paper's
claims checked on the measured numbers, the prediction-variance figures, plus
table.json and cases.csv (pseudonymous case ids only). Written into a temp folder and
renamed, so a report folder is always complete."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.evaluation.table import Claim, Table1


def _table_json(table: Table1) -> dict[str, Any]:
    rows = []
    for r in table.rows:
        row = {"method": r.method, "note": r.note}
        for name in ("auroc", "auprc", "lpips", "frechet"):
            value = getattr(r, name)
            row[name] = dataclasses.asdict(value) if value is not None else None
        row["auroc_ci"] = _interval_json(r.auroc_ci)
        row.update(mae=r.mae, region_mae=r.region_mae, latent_error=r.latent_error)
        rows.append(row)
    differences = [{"a": d.a, "b": d.b, "mean": d.mean, **_interval_json(d.interval)} for d in table.differences]
    return {
        "rows": rows,
        "frechet_space": table.frechet_space,
        "lpips": table.lpips,
        "n_cases": table.n_cases,
        "n_malignant": table.n_malignant,
        "n_boot": table.n_boot,
        "differences": differences,
    }


def _interval_json(interval) -> dict[str, float] | None:
    if interval is None:
        return None
    return {"low": interval.low, "high": interval.high, "n_boot_used": interval.n_boot_used}


def write_report(
    cfg,
    table: Table1,
    claims: list[Claim],
    cases: dict[str, Any],
    extras: dict[str, Any],
    evaluator_val: dict[str, float],
) -> Path:
    from cohortcast.evaluation.namd_evaluation import NAMD
    from cohortcast.evaluation.variance import (
        case_variance,
        plot_error_variance,
        plot_running_variance,
        plot_variance_maps,
    )
    from cohortcast.io.atomic import atomic_folder

    e, c = cfg.evaluation, extras["cohort"]
    folder = Path(e.report)
    namd_probs = table.row(NAMD).probabilities  # (N, n)
    cv = case_variance(cases["case_id"], cases["label"], namd_probs)
    with atomic_folder(folder, overwrite=True) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        plot_error_variance(cv, figures / "error_vs_variance.png")
        plot_running_variance(namd_probs, e.variance_cases, cfg.forecast.seed, figures / "running_variance.png")
        plot_variance_maps(
            cv,
            cases["baseline"],
            cases["mean"],
            cases["variance"],
            cases["target"],
            e.figure_cases,
            figures / "variance_maps.png",
        )
        (tmp / "table.json").write_text(
            json.dumps(
                {
                    "cohort": c,
                    "table": _table_json(table),
                    "claims": [dataclasses.asdict(x) for x in claims],
                    "evaluator_val": evaluator_val,
                },
                indent=2,
            )
        )
        with open(tmp / "cases.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case_id", "label", "mean_probability", "error", "variance"])
            writer.writeheader()
            writer.writerows(cv.rows())
        (tmp / "report.md").write_text(_markdown(cfg, table, claims, c, cv, evaluator_val))
    return folder / "report.md"


def _table_legend(table: Table1) -> list[str]:
    """What the optional Table-1 columns mean, only for those this table filled."""
    lines = []
    if table.n_boot:
        lines.append(
            f"AUROC 95% CI: percentiles of a patient-level bootstrap ({table.n_boot} resamples of the "
            "patients, all nodules of each drawn patient) of the mean-over-runs AUROC; differences use "
            "the same resamples for both methods."
        )
    if any(r.mae is not None for r in table.rows):
        lines.append(
            "MAE: mean absolute error of each method's per-case forecast (mean over samples; for "
            "copy-the-baseline, the baseline) against the real follow-up, whole crop; nodule MAE: "
            "inside the nodule region mask; latent error: of its mean latent against the follow-up's."
        )
    return [*lines, ""] if lines else []


def _markdown(cfg, table: Table1, claims: list[Claim], c: dict, cv, evaluator_val: dict[str, float]) -> str:
    notes = [f"- {r.method}: {r.note}" for r in table.rows if r.note]
    val = ", ".join(f"{k} {v:.3f}" for k, v in sorted(evaluator_val.items())) or "not measured (no val split)"
    confident = int(((cv.error < 0.25) & (cv.variance < np.median(cv.variance))).sum())
    lines = [
        f"# NAMD evaluation: {cfg.run_name}",
        "",
        f"Cohort: the `{c['split']}` split, {c['cases']} cases ({c['malignant']} malignant) from {c['patients']} "
        f"patients. Forecasts: {c['num_samples']} seeded DDIM samples per case, {c['inference_steps']} steps, "
        f"seed {c['seed']}; AUROC/AUPRC and image metrics are mean ± std over the {c['num_samples']} sample "
        "indices (sample k of every case = seed run k); real images have one run (std 0).",
        "",
        f"Evaluator: ViT trained on real follow-up crops of the train split; validation {val}.",
        *([f"{c['task_loss']}."] if c.get("task_loss") else []),
        f"Fréchet distance feature space: **{table.frechet_space}**. LPIPS: {table.lpips}.",
        "",
        "## Table 1",
        "",
        table.markdown(),
        "",
        *_table_legend(table),
        *notes,
        "",
        "## The paper's claims on these numbers",
        "",
        *[f"- {'holds' if x.holds else '**does not hold**'}: {x.text} ({x.detail})" for x in claims],
        "",
        "## Prediction variance (NAMD Sec. 4.3, App. D)",
        "",
        f"Mean probability variance over samples {cv.variance.mean():.3g} (max {cv.variance.max():.3g}); "
        f"{confident} of {len(cv.case_ids)} cases are confidently correct (error < 0.25, variance below the "
        "median).",
        "",
        "![error vs variance](figures/error_vs_variance.png)",
        "",
        "![running variance](figures/running_variance.png)",
        "",
        "![pixel variance maps](figures/variance_maps.png)",
        "",
        "Per-case values: `cases.csv`; all numbers: `table.json`.",
        "",
    ]
    return "\n".join(lines)
