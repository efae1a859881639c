"""The CLDM evaluation (jobs/evaluate_cldm.py, `cohortcast evaluate-cldm`): the paper's
Table 1 (forecast ILD masks of CT studies) and Table 2 (forecast radiograph reports) on
`cldm.evaluation.split`, with patient-bootstrap CIs, the paper's claims checked and
printed as holds / does not hold, a Markdown report and MLflow.

The job runs the CLDM job first (every stage already up to date is skipped), loads its
models and the split's study trajectories from its latent cache, and scores the tables
(`evaluate_cldm`, the core, takes loaded models and trajectories: tests call it with tiny
models). Targets, rows and choices: evaluation/cldm_targets.py, cldm_scoring.py and
cldm_report.CHOICES."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

from cohortcast.config.schema import CohortcastConfig
from cohortcast.evaluation.cldm_scoring import CLDMModels, report_table, segmentation_table
from cohortcast.evaluation.cldm_tables import Table1, Table2, report_claims, segmentation_claims
from cohortcast.evaluation.cldm_targets import CLDMEvaluationError, ResultCache, ct_targets, report_targets
from cohortcast.evaluation.table import Claim

log = logging.getLogger(__name__)


@dataclass
class CLDMEvaluation:
    table1: Table1 | None
    table2: Table2 | None
    claims: list[Claim]
    cohort: dict
    report: str | None = None
    mlflow: str = ""


def load_models(outputs, expected=None, tables=("segmentation", "report")) -> CLDMModels:
    """The job's trained models from its output folders (pipeline.cldm.CLDMOutputs)."""
    from cohortcast.models.cldm_forecaster import CLDMForecaster
    from cohortcast.models.report_decoder import ReportDecoder
    from cohortcast.models.segmentation_decoder import SegmentationDecoder
    from cohortcast.models.study_regressor import StudyRegressor

    needed = {"diffusion": True, "segmentation": "segmentation" in tables, "report": "report" in tables}
    missing = [name for name, need in needed.items() if need and getattr(outputs, name) is None]
    if missing:
        raise CLDMEvaluationError(
            f"the CLDM job has no {', '.join(missing)} model: add the stage(s) to cldm.training.stages, or "
            "leave the table out (cldm.evaluation.tables)"
        )

    def load(cls, folder):
        return None if folder is None else cls.load(folder, expected)

    folders = {
        "forecaster": outputs.diffusion,
        "segmentation": outputs.segmentation if needed["segmentation"] else None,
        "report": outputs.report if needed["report"] else None,
        "regressor": outputs.regressor,
    }
    return CLDMModels(
        load(CLDMForecaster, folders["forecaster"]),
        load(SegmentationDecoder, folders["segmentation"]),
        load(ReportDecoder, folders["report"]),
        load(StudyRegressor, folders["regressor"]),
        folders,
    )


def make_labeler(e):
    """The report labeler `cldm.evaluation.labeler` names."""
    if e.labeler == "chexbert":
        from cohortcast.evaluation.chexbert_labeler import CheXbertLabeler

        return CheXbertLabeler(e.chexbert_checkpoint, e.chexbert_bert_dir, uncertain=e.uncertain)
    from cohortcast.evaluation.report_labeler import RuleLabeler

    return RuleLabeler(uncertain=e.uncertain)


def evaluate_cldm(e, models: CLDMModels, ct=None, dx=None, labeler=None, cache_folder=None) -> CLDMEvaluation:
    """Tables 1-2 and the claims. `e` a CLDMEvaluationConfig; `ct`, `dx` the split's CT and
    radiograph StudyTrajectories (CT with masks); None leaves that table out."""
    if ct is None and dx is None:
        raise CLDMEvaluationError(f"the {e.split!r} split has no CT and no radiograph studies to evaluate")
    cache, started = ResultCache(cache_folder), time.perf_counter()
    cohort = {
        "split": e.split,
        "num_samples": e.num_samples,
        "inference_steps": e.inference_steps,
        "seed": e.seed,
        "bootstrap": e.bootstrap,
    }
    table1 = table2 = None
    claims: list[Claim] = []
    if ct is not None:
        targets = ct_targets(ct, models.max_priors, e.max_targets, e.seed)
        log.info("Table 1: %d CT targets from %d patients", len(targets), len(set(targets.patients)))
        table1 = segmentation_table(e, models, targets, cache)
        claims += segmentation_claims(table1, e.dice_margin)
        cohort |= {
            "skipped_ct": targets.skipped,
            "ct_cases": targets.case_ids,
            "ct_priors": targets.num_priors.tolist(),
        }
    if dx is not None:
        targets = report_targets(dx, models.max_priors, e.max_targets, e.seed)
        log.info("Table 2: %d radiograph targets from %d patients", len(targets), len(set(targets.patients)))
        table2 = report_table(e, models, targets, labeler or make_labeler(e), cache)
        claims += report_claims(table2)
        cohort |= {"skipped_dx": targets.skipped, "dx_cases": targets.case_ids}
    cohort["seconds"] = time.perf_counter() - started
    return CLDMEvaluation(table1, table2, claims, cohort)


def run_cldm_evaluation(cfg: CohortcastConfig) -> CLDMEvaluation:
    """The job: CLDM training stages (skipped when up to date), then the tables, report, MLflow."""
    from cohortcast.config import flatten
    from cohortcast.config.cldm import wired_models
    from cohortcast.config.paths import resolve_paths
    from cohortcast.data.prepare import prepare_cohort
    from cohortcast.evaluation.cldm_report import table_metrics, write_report
    from cohortcast.pipeline.cldm import CLDMJob, CLDMOutputs
    from cohortcast.ray_runtime import ensure_ray
    from cohortcast.tracking.job_runs import JobRuns
    from cohortcast.training.study_trajectories import load_trajectories

    cfg = resolve_paths(cfg)
    e = cfg.cldm.evaluation
    ensure_ray(cfg.ray)
    run_cfg = copy.deepcopy(cfg)
    run_cfg.run_name = f"{cfg.run_name}-evaluation"
    with JobRuns(run_cfg) as runs:
        card = prepare_cohort(cfg)
        outputs = CLDMJob(cfg).run(runs, card)
        if not isinstance(outputs, CLDMOutputs) or outputs.latents is None:
            raise CLDMEvaluationError(
                "the CLDM job gave no trained models and study latents (CLDMOutputs with 'study_latents' and "
                "'diffusion' in cldm.training.stages); this version's job trains the encoder and latents only"
            )
        models = load_models(outputs, wired_models(cfg.cldm), e.tables)
        ingested = card["config"]["output"]
        ct = load_trajectories(outputs.latents, e.split, 3, ingested) if "segmentation" in e.tables else None
        dx = load_trajectories(outputs.latents, e.split, 2) if "report" in e.tables else None
        run_id = runs.start_child("cldm_evaluation", flatten(e, "cldm.evaluation"))
        try:
            result = evaluate_cldm(e, models, ct, dx, cache_folder=e.cache or None)
            report = write_report(e.report, result)
            log.info("CLDM evaluation: report written to %s", report)
            runs.log_metrics(run_id, table_metrics(result.table1, result.table2))
            runs.log_metrics(run_id, {"claims_holding": sum(c.holds for c in result.claims)})
            if runs.enabled:
                runs.client.log_artifacts(run_id, str(report.parent), "report")
        except BaseException:
            runs.fail_child(run_id)
            raise
        runs.finish_child(run_id, "evaluated", {c.text: c.holds for c in result.claims})
        result.report, result.mlflow = str(report), runs.location()
        return result


def format_result(result: CLDMEvaluation) -> str:
    c = result.cohort
    lines = [
        f"CLDM evaluation on the {c['split']} split: {c['num_samples']} samples per target, "
        f"{c['inference_steps']} DDIM steps, seed {c['seed']}"
    ]
    if result.table1 is not None:
        t = result.table1
        lines += ["", f"Table 1 ({t.targets} CT targets, {t.patients} patients)", t.markdown()]
    if result.table2 is not None:
        t = result.table2
        lines += ["", f"Table 2 ({t.targets} radiograph targets, {t.patients} patients)", t.markdown()]
    lines.append("")
    lines += [f"{'holds' if cl.holds else 'does NOT hold'}: {cl.text} ({cl.detail})" for cl in result.claims]
    if result.report:
        lines.append(f"report: {result.report}")
    if result.mlflow:
        lines.append(result.mlflow)
    return "\n".join(lines)


__all__ = ["CLDMEvaluation", "evaluate_cldm", "format_result", "load_models", "run_cldm_evaluation"]
