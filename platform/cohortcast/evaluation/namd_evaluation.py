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
from cohortcast.errors import CohortcastError, MissingInputError
from cohortcast.evaluation.table import Claim, Method, Table1

log = logging.getLogger(__name__)

REAL_BASELINE, REAL_FOLLOW_UP = "Real baseline", "Real follow-up"
NAMD, ABLATION, COPY = "NAMD forecast", "NAMD w/o alignment + probe", "Copy the baseline"
REGRESSOR, VAE_FLOOR = "No-diffusion regressor", "VAE floor (decoded real follow-up latent)"


class EvaluationError(CohortcastError, ValueError):
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
    """The same NAMD job without the alignment and probe losses; every other setting,
    L_task included, stays as NAMD's. Only "probe_bce" cannot be kept (the ablation's
    probe is untrained): it becomes "none" and the table says so."""
    a = copy.deepcopy(cfg)
    a.run_name = f"{cfg.run_name}-ablation"
    a.model.vae.loss.alignment = 0.0
    a.model.vae.loss.probe = 0.0
    if cfg.training.task_loss == "probe_bce":
        a.training.task_loss, a.training.task_weight = "none", 0.0
    a.training.output = cfg.evaluation.ablation.training_output
    return a


def regressor_config(cfg: CohortcastConfig) -> CohortcastConfig:
    """The NAMD job with its `regressor` stage added (stages already trained are skipped)."""
    r = copy.deepcopy(cfg)
    r.run_name = f"{cfg.run_name}-regressor"
    r.training.stages = tuple(dict.fromkeys([*cfg.training.stages, "ldm_uncond", "regressor"]))
    return r


def task_loss_note(cfg: CohortcastConfig, ablation: CohortcastConfig) -> str:
    def describe(t) -> str:
        return t.task_loss if t.task_loss == "none" else f"{t.task_loss} (lambda {t.task_weight})"

    return f"L_task: NAMD {describe(cfg.training)}, ablation {describe(ablation.training)}"


def _tensor(table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).combine_chunks().to_numpy_ndarray(), np.float32)


def load_cases(output: str | Path) -> dict[str, Any]:
    """A forecast folder's finished cases as arrays, sorted by case id."""
    from cohortcast.inference.cohort_forecast import read_forecasts

    table = read_forecasts(output)
    if table is None:
        raise MissingInputError(f"{output}: no finished forecasts")
    table = table.sort_by("case_id")
    out = {
        "case_id": table.column("case_id").to_pylist(),
        "patient": table.column("patient").to_pylist(),
        "label": np.asarray(table.column("malignant").to_pylist()),
        "baseline": _tensor(table, "baseline"),
        "target": _tensor(table, "target"),
        "mean": _tensor(table, "mean"),
        "variance": _tensor(table, "variance"),
        "samples": _tensor(table, "samples"),
    }
    for name in ("mean_latent", "baseline_latent", "target_latent", "target_reconstruction"):
        out[name] = _tensor(table, name)
    out["target_diameter_mm"] = np.asarray(table.column("target_diameter_mm").to_pylist(), np.float32)
    return out


def region_masks(diameters_mm: np.ndarray, size: int, spacing_mm: float, margin_mm: float) -> np.ndarray:
    """(n,) follow-up long diameters -> (n, size, size) discs around the crop centre (the
    nodule, which ingestion centres), radius diameter / 2 + margin."""
    offsets = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    distance = np.hypot(offsets[None, :], offsets[:, None])  # (size, size) mm from the centre
    radius = np.asarray(diameters_mm, np.float32) / 2.0 + margin_mm
    return distance[None] <= radius[:, None, None]


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
        from cohortcast.evaluation.evaluator_stage import evaluator_worker_loop, followup_dataset
        from cohortcast.io import stage_outputs as outputs
        from cohortcast.models.evaluator import MalignancyEvaluator
        from cohortcast.training.stage_runner import StageRunner

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
            train = followup_dataset(ingested, "train", augment=True, data_cpus=scaling.data_cpus)
            if train is None:
                raise ValueError(f"{ingested}: the train split has no follow-up crop to train the evaluator on")
            return {"train": train, "val": followup_dataset(ingested, "val", data_cpus=scaling.data_cpus)}

        runner = StageRunner(self.cfg.training.output, scaling)
        folder = runner.train(
            runs,
            "evaluator",
            key,
            evaluator_worker_loop,
            {"stage": ev.train, "model": ev, "image_size": image_size},
            datasets,
            export,
            flatten(ev, "evaluation.evaluator"),
            folder=Path(self.e.evaluator_output),
        )
        metrics = (outputs.read_marker(folder) or {}).get("metrics", {})
        return folder, {k[4:]: v for k, v in metrics.items() if k.startswith("val/")}

    def forecast(self, runs, name: str, forecaster: str, output: str) -> dict[str, Any]:
        from cohortcast.config import flatten
        from cohortcast.inference.cohort_forecast import run_cohort_forecast

        job = replace(self.cfg.forecast, forecaster=forecaster, output=output, max_cases=None)
        log.info("evaluate: %s: the %r split with %s -> %s", name, job.split, forecaster, output)
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


def _regressor_of(training_output: str) -> str:
    return str(Path(training_output) / "regressor")


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
    # NAMD itself when forecast.forecaster holds none yet (from scratch: everything is
    # trained), and the regressor stage next to it; stages already trained are skipped.
    from cohortcast.models.forecaster import CONFIG_FILE

    if e.regressor.enabled:
        log.info("no-diffusion regressor: the NAMD job's regressor stage -> %s", _regressor_of(cfg.training.output))
        run_namd(regressor_config(cfg))
    elif not (Path(cfg.forecast.forecaster) / CONFIG_FILE).is_file():
        log.info("no Forecaster at %s yet: training NAMD first", cfg.forecast.forecaster)
        run_namd(cfg)
    evaluation_cfg = copy.deepcopy(cfg)
    evaluation_cfg.run_name = f"{cfg.run_name}-evaluation"
    job = EvaluationJob(cfg)
    with JobRuns(evaluation_cfg) as runs:
        card = prepare_cohort(cfg)  # reuses the ingested cohort when it is up to date
        evaluator_folder, evaluator_val = job.train_evaluator(runs, card)
        job.forecast(runs, "forecast_namd", cfg.forecast.forecaster, cfg.forecast.output)
        if e.ablation.enabled:
            job.forecast(runs, "forecast_ablation", _forecaster_of(e.ablation.training_output), e.ablation.forecasts)
        if e.regressor.enabled:
            job.forecast(runs, "forecast_regressor", _regressor_of(cfg.training.output), e.regressor.forecasts)
        log.info("evaluate: scoring the forecasts (evaluator, image metrics, bootstrap)")
        table, claims, cases, extras = score(cfg, evaluator_folder)
        report = write_report(cfg, table, claims, cases, extras, evaluator_val)
        log.info("evaluate: report written to %s", report)
        if runs.enabled:
            _log_to_mlflow(runs, table, report)
        cohort = extras["cohort"]
        return EvaluationResult(table, claims, str(report), runs.location(), evaluator_val, cohort)


def score(cfg: CohortcastConfig, evaluator_folder: Path):
    """Evaluator probabilities and image metrics for every method -> Table 1 + claims."""
    import torch

    from cohortcast.evaluation.feature_networks import (
        EVALUATOR_SPACE,
        INCEPTION_SPACE,
        batched,
        inception_features,
        lpips_distances,
    )
    from cohortcast.evaluation.table import compute_table, difference_claims, error_claims, paper_claims
    from cohortcast.models.evaluator import MalignancyEvaluator

    e = cfg.evaluation
    evaluator = MalignancyEvaluator.load(evaluator_folder)
    cases = load_cases(cfg.forecast.output)
    others = {
        ABLATION: load_cases(e.ablation.forecasts) if e.ablation.enabled else None,
        REGRESSOR: load_cases(e.regressor.forecasts) if e.regressor.enabled else None,
    }
    others = {k: v for k, v in others.items() if v is not None}
    shared = sorted(set(cases["case_id"]).intersection(*(set(o["case_id"]) for o in others.values())))
    if len(shared) < len(cases["case_id"]):
        log.warning(
            "the other methods' forecasts cover %d of %d cases: the table uses the shared ones",
            len(shared),
            len(cases["case_id"]),
        )
    keep = [c for c, y in zip(cases["case_id"], cases["label"]) if c in set(shared) and y >= 0]
    if len(keep) < len(shared):
        log.warning("%d cases without a malignancy label are left out", len(shared) - len(keep))
    cases = _select(cases, keep)
    others = {k: _select(v, keep) for k, v in others.items()}
    labels = cases["label"]
    if len(set(labels.tolist())) < 2:
        raise EvaluationError(
            f"the {cfg.forecast.split!r} split has {len(labels)} labelled case(s), all of class "
            f"{sorted(set(labels.tolist()))}: AUROC needs benign and malignant cases; use a larger "
            "cohort or another forecast.split"
        )

    def probabilities(images: np.ndarray) -> np.ndarray:
        return batched(lambda x: torch.sigmoid(evaluator(x)), images, e.batch_size)

    if e.inception_torchscript:
        features, space = inception_features(e.inception_torchscript, e.batch_size), INCEPTION_SPACE
    else:
        features, space = (lambda images: batched(evaluator.features, images, e.batch_size)), EVALUATOR_SPACE
    lpips, lpips_label = None, "n/a: no LPIPS weights configured (evaluation.lpips_vgg_path, evaluation.lpips_path)"
    if e.lpips_vgg_path:
        lpips, lpips_label = lpips_distances(e.lpips_vgg_path, e.lpips_path, e.batch_size), "LPIPS (VGG16)"

    def forecast_method(name: str, forecasts: dict, same_vae: bool, note: str = "") -> Method:
        runs = [forecasts["samples"][:, k] for k in range(forecasts["samples"].shape[1])]
        # Latent errors are comparable only in one latent space: the ablation has its own VAE.
        return Method(
            name,
            runs,
            generated=True,
            mean_image=forecasts["mean"],
            latent=forecasts["mean_latent"] if same_vae else None,
            note=note,
        )

    methods = [
        Method(REAL_BASELINE, [cases["baseline"]], generated=False),
        Method(REAL_FOLLOW_UP, [cases["target"]], generated=False),
        forecast_method(NAMD, cases, True),
    ]
    ablation_note = task_loss_note(cfg, ablation_config(cfg))
    if ABLATION in others:
        methods.append(
            forecast_method(
                ABLATION, others[ABLATION], False, note=f"{ablation_note}; latent error n/a: its own VAE's latent space"
            )
        )
    if REGRESSOR in others:
        methods.append(
            forecast_method(
                REGRESSOR,
                others[REGRESSOR],
                True,
                note="one deterministic prediction per case: its std over seeds is 0",
            )
        )
    methods.append(
        Method(
            COPY,
            [cases["baseline"]],
            generated=True,
            mean_image=cases["baseline"],
            latent=cases["baseline_latent"],
            note="forecasts the baseline unchanged: its AUROC/AUPRC equal the real baseline's",
        )
    )
    methods.append(
        Method(
            VAE_FLOOR,
            [cases["target_reconstruction"]],
            generated=True,
            mean_image=cases["target_reconstruction"],
            latent=cases["target_latent"],
            note="the best any latent forecast can do through this VAE's decoder",
        )
    )
    crop = cases["target"].shape[-1]
    masks = region_masks(cases["target_diameter_mm"], crop, float(card_spacing(cfg)), e.region_margin_mm)
    pairs = [(NAMD, REAL_BASELINE)] + [(NAMD, other) for other in (ABLATION, REGRESSOR) if other in others]
    table = compute_table(
        methods,
        labels,
        cases["target"],
        probabilities,
        features,
        space,
        lpips,
        lpips_label,
        patients=cases["patient"],
        target_latents=cases["target_latent"],
        region_masks=masks,
        n_boot=e.bootstrap,
        boot_seed=cfg.forecast.seed,
        differences=pairs,
    )
    claims = paper_claims(table, NAMD, ABLATION if ABLATION in others else None, REAL_BASELINE, REAL_FOLLOW_UP)
    claims += error_claims(table, NAMD, [COPY] + ([REGRESSOR] if REGRESSOR in others else []))
    claims += difference_claims(table)
    cohort = {
        "split": cfg.forecast.split,
        "cases": len(labels),
        "malignant": int(labels.sum()),
        "patients": len(set(cases["patient"])),
        "num_samples": int(cases["samples"].shape[1]),
        "inference_steps": cfg.forecast.inference_steps,
        "seed": cfg.forecast.seed,
        "task_loss": ablation_note,
    }
    return table, claims, cases, {"cohort": cohort, "ablation": others.get(ABLATION)}


def card_spacing(cfg: CohortcastConfig) -> float:
    """The crops' pixel spacing (mm), from the ingested cohort's card."""
    import json

    card = json.loads((Path(cfg.forecast.ingested) / "card.json").read_text())
    return float(card["config"]["crop_spacing_mm"])


def _log_to_mlflow(runs, table: Table1, report: Path) -> None:
    metrics = {}
    for row in table.rows:
        slug = "".join(
            ch for ch in row.method.lower().replace(" ", "_").replace("+", "and") if ch.isalnum() or ch in "_-"
        )
        for name in ("auroc", "auprc", "lpips", "frechet"):
            value = getattr(row, name)
            if value is not None:
                metrics[f"{slug}/{name}_mean"], metrics[f"{slug}/{name}_std"] = value.mean, value.std
        if row.auroc_ci is not None:
            metrics[f"{slug}/auroc_ci_low"], metrics[f"{slug}/auroc_ci_high"] = row.auroc_ci.low, row.auroc_ci.high
        for name in ("mae", "region_mae", "latent_error"):
            if getattr(row, name) is not None:
                metrics[f"{slug}/{name}"] = getattr(row, name)
    for key, value in metrics.items():
        runs.client.log_metric(runs.parent_id, key, value)
    runs.client.log_artifacts(runs.parent_id, str(report.parent), "report")


def format_result(result: EvaluationResult) -> str:
    c = result.cohort
    lines = [
        f"NAMD evaluation on the {c['split']} split: {c['cases']} cases ({c['malignant']} malignant) from "
        f"{c['patients']} patients; {c['num_samples']} samples per case, {c['inference_steps']} DDIM steps, "
        f"seed {c['seed']}",
        "",
        result.table.markdown(),
        "",
    ]
    lines += [f"{'holds' if cl.holds else 'does NOT hold'}: {cl.text} ({cl.detail})" for cl in result.claims]
    if result.evaluator_val:
        lines.append(
            "evaluator validation: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.evaluator_val.items()))
        )
    lines += [f"report: {result.report}", result.mlflow]
    return "\n".join(lines)
