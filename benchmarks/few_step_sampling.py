"""Few-step sampling at equal quality: the trained NAMD forecaster forecasts the whole
evaluation cohort with DDIM and DPM-Solver++ at 50, 20, 10 and 5 steps, through the real
cohort job (Ray Data actor pool, per-case Parquet), and each setting is scored with the
trained evaluator like Table 1: AUROC (mean over sample runs), its paired patient-
bootstrap difference against 50-step DDIM, mean-forecast MAE and the wall time.

    cohortcast evaluate --config jobs/configs/namd_cpu.yaml      # trains what this reads
    python benchmarks/few_step_sampling.py [--workdir runs/namd-cpu] [--samples 4]

Record the output in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

SETTINGS = [
    ("ddim", 50),
    ("ddim", 20),
    ("ddim", 10),
    ("ddim", 5),
    ("dpmsolver++", 20),
    ("dpmsolver++", 10),
    ("dpmsolver++", 5),
]


def _forecast(job, out: Path, sampler: str, steps: int, llm_path) -> tuple[float, dict]:
    """The whole cohort job's wall time, and its summary (where the time went)."""
    from dataclasses import replace

    from cohortcast.inference.cohort_forecast import run_cohort_forecast

    started = time.perf_counter()
    summary = run_cohort_forecast(
        replace(job, output=str(out), sampler=sampler, inference_steps=steps, write_dicom=False), llm_path=llm_path
    )
    return time.perf_counter() - started, summary


def _score(cases, evaluator, reference) -> dict:
    import numpy as np
    import torch

    from cohortcast.evaluation.feature_networks import batched
    from cohortcast.evaluation.metrics import mean_auroc, paired_bootstrap

    row = {"mae": float(np.abs(cases["mean"] - cases["target"]).mean()), "_cases": cases}
    if reference is not None:
        ref_cases = reference["_cases"]
        if list(cases["case_id"]) != list(ref_cases["case_id"]):
            raise SystemExit("the settings forecast different cases (or in another order): cannot pair them")
        # Sample k of a case starts from the same seeded noise under every setting and both
        # samplers solve the same ODE (eta 0): the distance to DDIM-50's sample is the
        # solver's error against it, beside the spread of the samples themselves.
        row["sample_gap"] = float(np.abs(cases["samples"] - ref_cases["samples"]).mean())
    else:
        row["sample_spread"] = float(np.abs(cases["samples"] - cases["samples"].mean(1, keepdims=True)).mean())
    if evaluator is None:
        return row
    labels = cases["label"]
    runs = np.stack(
        [
            batched(lambda x: torch.sigmoid(evaluator(x)), cases["samples"][:, k], 64)
            for k in range(cases["samples"].shape[1])
        ]
    )
    row["auroc"] = mean_auroc(labels, runs)
    row["_runs"] = runs
    if reference is not None:
        ref = reference["_runs"]
        ci = paired_bootstrap(
            cases["patient"], lambda i: mean_auroc(labels[i], runs[:, i]), lambda i: mean_auroc(labels[i], ref[:, i])
        )
        row["auroc_minus_ddim50"] = row["auroc"] - reference["auroc"]
        row["ci"] = [ci.low, ci.high]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/namd-cpu", help="a finished `cohortcast evaluate` workdir")
    parser.add_argument("--config", default="jobs/configs/namd_cpu.yaml", help="the config that trained it")
    parser.add_argument("--samples", type=int, default=4, help="samples per case (Table 1 used 4)")
    parser.add_argument(
        "--settings",
        help="comma-separated SAMPLER:STEPS to run (default: all; the first is the reference), e.g. ddim:50,dpmsolver++:5",
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    from dataclasses import replace

    import torch

    from cohortcast.config import load_config
    from cohortcast.config.paths import resolve_paths
    from cohortcast.evaluation.namd_evaluation import load_cases
    from cohortcast.models.evaluator import MalignancyEvaluator
    from cohortcast.ray_runtime import ensure_ray

    settings = (
        [(name, int(steps)) for name, steps in (item.split(":") for item in args.settings.split(","))]
        if args.settings
        else SETTINGS
    )
    cfg = resolve_paths(load_config(args.config, [f"workdir={args.workdir}"]))
    ensure_ray(cfg.ray)
    job, llm_path = replace(cfg.forecast, num_samples=args.samples), cfg.model.conditioner.llm_path
    evaluator = MalignancyEvaluator.load(cfg.evaluation.evaluator_output)
    out_root = Path(args.workdir) / "few_step"
    rows, reference = [], None
    for sampler, steps in settings:
        out = out_root / f"{sampler}-{steps}"
        if (out / "cases").is_dir():  # a rerun times the whole job again, not a resume
            shutil.rmtree(out)
        wall, summary = _forecast(job, out, sampler, steps, llm_path)
        with torch.no_grad():
            row = _score(load_cases(out), evaluator, reference)
        reference = reference or row
        # model_s: the Forecaster's own time per case in the actors (VAE, conditioning,
        # sampler), i.e. what a warm Serve replica pays; the rest of the wall is the job's
        # fixed cost (actor start-up, case table, scheduling) and writing.
        row.update(
            sampler=sampler,
            steps=steps,
            wall_s=wall,
            model_s=summary["model_seconds_per_case"],
            write_s=summary["write_seconds_per_case"],
            prepare_s=summary["prepare_seconds"],
            load_s=summary["actor_load_seconds"],
        )
        rows.append(row)
        print(
            f"{sampler:>12} {steps:>3} steps: wall {wall:7.1f}s  model {1e3 * row['model_s']:6.1f} ms/case  "
            f"write {1e3 * row['write_s']:5.1f} ms/case  prepare {row['prepare_s']:.1f}s  "
            f"MAE {row['mae']:.4f}  AUROC {row.get('auroc', float('nan')):.3f}",
            flush=True,
        )
    base = rows[0]
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"cases {len(load_cases(out_root / f'{settings[0][0]}-{settings[0][1]}')['case_id'])}, samples {job.num_samples}"
    )
    print(
        "| sampler | steps | job wall (s) | job speed-up | model ms/case | model speed-up "
        "| mean-forecast MAE | sample - DDIM-50 sample | AUROC | AUROC - DDIM-50 [95% CI] |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['auroc_minus_ddim50']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" if "ci" in r else "–"
        auroc = f"{r['auroc']:.3f}" if "auroc" in r else "–"
        gap = f"{r['sample_gap']:.4f}" if "sample_gap" in r else f"– (spread {r['sample_spread']:.4f})"
        print(
            f"| {r['sampler']} | {r['steps']} | {r['wall_s']:.1f} | {base['wall_s'] / r['wall_s']:.1f}x "
            f"| {1e3 * r['model_s']:.1f} | {base['model_s'] / r['model_s']:.1f}x | {r['mae']:.4f} | {gap} | {auroc} | {diff} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], indent=1)
        )


if __name__ == "__main__":
    main()
