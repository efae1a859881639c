"""The NAMD evaluation job (jobs/evaluate_namd.py): Table 1 and the prediction-variance
analysis on the forecast split, in one MLflow parent run.

Steps, each reusing its valid output: (1) the ablation (NAMD without alignment and
probe losses) trained by the NAMD job itself, if configured; (2) the evaluator ViT,
trained on Ray Train like a NAMD stage; (3) cohort forecasts of NAMD and the ablation
(resumable per case); (4) the table, the variance figures and the report.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cohortcast.config.schema import CohortcastConfig
from cohortcast.evaluation.table import Claim, Method, Table1

log = logging.getLogger(__name__)

REAL_BASELINE, REAL_FOLLOW_UP = "Real baseline", "Real follow-up"
NAMD, ABLATION, COPY = "NAMD forecast", "NAMD w/o alignment + probe", "Copy the baseline"


class EvaluationError(ValueError):
    """The data cannot support the evaluation (e.g. a split with one class only)."""


@dataclass
class EvaluationResult:
    table: Table1
    claims: list[Claim]
    report: str
    mlflow: str
    evaluator_val: dict[str, float]
    cohort: dict[str, Any]


def ablation_config(cfg: CohortcastConfig) -> CohortcastConfig:
    """The same NAMD job without the alignment and probe losses, hence no probe task loss."""
    a = copy.deepcopy(cfg)
    a.run_name = f"{cfg.run_name}-ablation"
    a.model.vae.loss.alignment = 0.0
    a.model.vae.loss.probe = 0.0
    a.training.task_loss, a.training.task_weight = "none", 0.0
    a.training.output = cfg.evaluation.ablation.training_output
    return a


def _tensor(table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks().to_numpy_ndarray(), np.float32)


def load_cases(output: str | Path) -> dict[str, Any]:
    """A forecast folder's finished cases as arrays, sorted by case id."""
    from cohortcast.inference.cohort_forecast import read_forecasts

    table = read_forecasts(output)
    if table is None:
        raise FileNotFoundError(f"{output}: no finished forecasts")
    table = table.sort_by("case_id")
    return {"case_id": table.column("case_id").to_pylist(), "patient": table.column("patient").to_pylist(),
            "label": np.asarray(table.column("malignant").to_pylist()), "baseline": _tensor(table, "baseline"),
            "target": _tensor(table, "target"), "mean": _tensor(table, "mean"),
            "variance": _tensor(table, "variance"), "samples": _tensor(table, "samples")}


def _select(cases: dict[str, Any], keep: list[str]) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(cases["case_id"])}
    rows = [index[c] for c in keep]
    return {k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) for k, v in cases.items()}


class EvaluationJob:
    def __init__(self, cfg: CohortcastConfig):
        self.cfg = cfg
        self.e = cfg.evaluation

    def train_evaluator(self, runs, card: dict) -> tuple[Path, dict[str, float]]:
        from cohortcast.config import flatten
        from cohortcast.models.evaluator import MalignancyEvaluator
        from cohortcast.pipeline import stage_outputs as outputs
        from cohortcast.pipeline.namd import NAMDJob
        from cohortcast.training.evaluator_stage import evaluator_worker_loop, followup_dataset

        ev, scaling = self.e.evaluator, self.cfg.training.scaling
        image_size = int(card["config"]["crop_size"])
        key = outputs.stage_key("evaluator", ev, card["fingerprint"], scaling.num_workers)
        ingested = card["config"]["output"]

        def export(checkpoint, folder: Path) -> None:
            from cohortcast.training.export import consolidated_state_dict

            model = MalignancyEvaluator.build(ev, image_size)  # the architecture; weights from the checkpoint
            model.load_state_dict(consolidated_state_dict(checkpoint))
            model.save(folder)

        def datasets() -> dict:
            train = followup_dataset(ingested, "train", augment=True)
            if train is None:
                raise ValueError(f"{ingested}: the train split has no follow-up crop to train the evaluator on")
            return {"train": train, "val": followup_dataset(ingested, "val")}

        job = NAMDJob(self.cfg)
        folder = job.train_stage(runs, "evaluator", key, evaluator_worker_loop,
                                 {"stage": ev.train, "model": ev, "image_size": image_size}, datasets, export,
                                 flatten(ev, "evaluation.evaluator"), folder=Path(self.e.evaluator_output))
        metrics = (outputs.read_marker(folder) or {}).get("metrics", {})
        return folder, {k[4:]: v for k, v in metrics.items() if k.startswith("val/")}

    def forecast(self, runs, name: str, forecaster: str, output: str) -> dict[str, Any]:
        from cohortcast.config import flatten
        from cohortcast.inference.cohort_forecast import run_cohort_forecast

        job = replace(self.cfg.forecast, forecaster=forecaster, output=output, max_cases=None)
        run_id = runs.start_child(name, flatten(job, "forecast"))
        try:
            summary = run_cohort_forecast(job, llm_path=self.cfg.model.conditioner.llm_path)
        except BaseException:
            runs.fail_child(run_id)
            raise
        runs.finish_child(run_id, "forecast", summary)
        return summary


def _forecaster_of(training_output: str) -> str:
    return str(Path(training_output) / "ldm_cond")


def run_evaluation(cfg: CohortcastConfig) -> EvaluationResult:
    from cohortcast.config.paths import resolve_paths
    from cohortcast.data.prepare import prepare_cohort
    from cohortcast.evaluation.report import write_report
    from cohortcast.pipeline.namd import run_namd
    from cohortcast.ray_runtime import ensure_ray
    from cohortcast.tracking.job_runs import JobRuns

    cfg = resolve_paths(cfg)
    ensure_ray(cfg.ray)
    e = cfg.evaluation
    if e.ablation.enabled and e.ablation.train_if_missing:
        log.info("ablation: NAMD without alignment and probe losses -> %s", e.ablation.training_output)
        run_namd(ablation_config(cfg))  # stages already trained with this config are skipped
    evaluation_cfg = copy.deepcopy(cfg)
    evaluation_cfg.run_name = f"{cfg.run_name}-evaluation"
    job = EvaluationJob(cfg)
    with JobRuns(evaluation_cfg) as runs:
        card = prepare_cohort(cfg)  # reuses the ingested cohort when it is up to date
        evaluator_folder, evaluator_val = job.train_evaluator(runs, card)
        job.forecast(runs, "forecast_namd", cfg.forecast.forecaster, cfg.forecast.output)
        if e.ablation.enabled:
            job.forecast(runs, "forecast_ablation", _forecaster_of(e.ablation.training_output), e.ablation.forecasts)
        table, claims, cases, extras = score(cfg, evaluator_folder)
        report = write_report(cfg, table, claims, cases, extras, evaluator_val)
        if runs.enabled:
            _log_to_mlflow(runs, table, report)
        cohort = extras["cohort"]
        return EvaluationResult(table, claims, str(report), runs.location(), evaluator_val, cohort)


def score(cfg: CohortcastConfig, evaluator_folder: Path):
    """Evaluator probabilities and image metrics for every method -> Table 1 + claims."""
    import torch

    from cohortcast.evaluation.feature_networks import (EVALUATOR_SPACE, INCEPTION_SPACE, batched,
                                                         inception_features, lpips_distances)
    from cohortcast.evaluation.table import compute_table, paper_claims
    from cohortcast.models.evaluator import MalignancyEvaluator

    e = cfg.evaluation
    evaluator = MalignancyEvaluator.load(evaluator_folder)
    cases = load_cases(cfg.forecast.output)
    ablation = load_cases(e.ablation.forecasts) if e.ablation.enabled else None
    if ablation is not None:
        shared = sorted(set(cases["case_id"]) & set(ablation["case_id"]))
        if len(shared) < len(cases["case_id"]):
            log.warning("ablation forecasts cover %d of %d cases: the table uses the shared ones", len(shared),
                        len(cases["case_id"]))
        cases, ablation = _select(cases, shared), _select(ablation, shared)
    labels = cases["label"]
    known = labels >= 0
    if not known.all():
        log.warning("%d cases without a malignancy label are left out", int((~known).sum()))
        keep = [c for c, k in zip(cases["case_id"], known) if k]
        cases = _select(cases, keep)
        ablation = _select(ablation, keep) if ablation is not None else None
        labels = cases["label"]
    if len(set(labels.tolist())) < 2:
        raise EvaluationError(f"the {cfg.forecast.split!r} split has {len(labels)} labelled case(s), all of class "
                              f"{sorted(set(labels.tolist()))}: AUROC needs benign and malignant cases; use a larger "
                              "cohort or another forecast.split")

    def probabilities(images: np.ndarray) -> np.ndarray:
        return batched(lambda x: torch.sigmoid(evaluator(x)), images, e.batch_size)

    if e.inception_torchscript:
        features, space = inception_features(e.inception_torchscript, e.batch_size), INCEPTION_SPACE
    else:
        features, space = (lambda images: batched(evaluator.features, images, e.batch_size)), EVALUATOR_SPACE
    lpips, lpips_label = None, "n/a: no LPIPS weights configured (evaluation.lpips_vgg_path, evaluation.lpips_path)"
    if e.lpips_vgg_path:
        lpips, lpips_label = lpips_distances(e.lpips_vgg_path, e.lpips_path, e.batch_size), "LPIPS (VGG16)"

    n_samples = cases["samples"].shape[1]
    methods = [Method(REAL_BASELINE, [cases["baseline"]], generated=False),
               Method(REAL_FOLLOW_UP, [cases["target"]], generated=False),
               Method(NAMD, [cases["samples"][:, k] for k in range(n_samples)], generated=True)]
    if ablation is not None:
        methods.append(Method(ABLATION, [ablation["samples"][:, k] for k in range(ablation["samples"].shape[1])],
                              generated=True))
    methods.append(Method(COPY, [cases["baseline"]], generated=True,
                          note="forecasts the baseline unchanged: its AUROC/AUPRC equal the real baseline's"))
    table = compute_table(methods, labels, cases["target"], probabilities, features, space, lpips, lpips_label)
    claims = paper_claims(table, NAMD, ABLATION if ablation is not None else None, REAL_BASELINE, REAL_FOLLOW_UP)
    cohort = {"split": cfg.forecast.split, "cases": len(labels), "malignant": int(labels.sum()),
              "patients": len(set(cases["patient"])), "num_samples": int(n_samples),
              "inference_steps": cfg.forecast.inference_steps, "seed": cfg.forecast.seed}
    return table, claims, cases, {"cohort": cohort, "ablation": ablation}


def _log_to_mlflow(runs, table: Table1, report: Path) -> None:
    metrics = {}
    for row in table.rows:
        slug = row.method.lower().replace(" ", "_").replace("/", "").replace("+", "and")
        for name in ("auroc", "auprc", "lpips", "frechet"):
            value = getattr(row, name)
            if value is not None:
                metrics[f"{slug}/{name}_mean"], metrics[f"{slug}/{name}_std"] = value.mean, value.std
    for key, value in metrics.items():
        runs.client.log_metric(runs.parent_id, key, value)
    runs.client.log_artifacts(runs.parent_id, str(report.parent), "report")


def format_result(result: EvaluationResult) -> str:
    c = result.cohort
    lines = [f"NAMD evaluation on the {c['split']} split: {c['cases']} cases ({c['malignant']} malignant) from "
             f"{c['patients']} patients; {c['num_samples']} samples per case, {c['inference_steps']} DDIM steps, "
             f"seed {c['seed']}", "", result.table.markdown(), ""]
    lines += [f"{'holds' if cl.holds else 'does NOT hold'}: {cl.text} (AUROC {cl.detail})" for cl in result.claims]
    if result.evaluator_val:
        lines.append("evaluator validation: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.evaluator_val.items())))
    lines += [f"report: {result.report}", result.mlflow]
    return "\n".join(lines)
