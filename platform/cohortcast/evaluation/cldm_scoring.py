"""Scoring CLDM's two tables: the forecasts of each method decoded and scored target by
target (evaluation/cldm_targets.py picks the targets and runs the batched forecasts).

Table 1, per CT target: copy-last (the last prior's true mask), the no-diffusion
regressor, the CLDM with its context truncated to 1 / 3 priors and with all of them (one
trained model; the truncated rows are not retrained models), and the current-exam bound
(the segmentation decoder on the target's own tokens). Each CLDM sample's tokens go
through the segmentation decoder; sample probabilities give the per-sample masks and the
mean forecast (segmentation_metrics). Table 2, per radiograph target: the previous exam's
report copied, the report decoder on the CLDM's mean forecast tokens with the last prior's
tokens and without, on the regressor's tokens (with prior) and on the target's own tokens
(with prior)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cohortcast.evaluation.cldm_tables import (
    BOUND,
    BOUND_PRIOR,
    CLDM_ALL,
    CLDM_ALL_ANCHORED,
    CLDM_NO_PRIOR,
    CLDM_PRIOR,
    COPY_LAST,
    COPY_PRIOR,
    NO_DIFFUSION,
    NO_DIFFUSION_ANCHORED,
    NO_DIFFUSION_PRIOR,
    REPORT_METRICS,
    ReportDifference,
    ReportRow,
    Table1,
    Table2,
    cldm_k,
)
from cohortcast.evaluation.cldm_targets import (
    CLDMEvaluationError,
    ResultCache,
    Targets,
    cache_key,
    forecast_batches,
)
from cohortcast.evaluation.metrics import paired_bootstrap, patient_bootstrap
from cohortcast.evaluation.segmentation_metrics import (
    METRICS,
    CaseScores,
    SegmentationTarget,
    grid_spacing_mm,
    mask_metrics,
    paired_difference,
    score_case,
    summarise,
)
from cohortcast.io.stage_outputs import folder_digest
from cohortcast.models.mask_anchoring import anchored_mask


@dataclass
class CLDMModels:
    """The trained models the tables need (None: that row or table is left out) and the
    folders they came from (for the result cache; None: not cached)."""

    forecaster: object
    segmentation: object | None = None
    report: object | None = None
    regressor: object | None = None
    folders: dict[str, Path | None] = field(default_factory=dict)

    @property
    def max_priors(self) -> int:
        return int(self.forecaster.cfg.temporal.max_exams)

    def digests(self, names: list[str]) -> list[str] | None:
        """The named folders' content digests, or None when any is unknown (no caching)."""
        if any(self.folders.get(n) is None for n in names):
            return None
        cache = self.__dict__.setdefault("_digests", {})
        for n in names:
            if n not in cache:
                cache[n] = folder_digest(self.folders[n])
        return [cache[n] for n in names]


def _slug(method: str) -> str:
    return "".join(ch for ch in method.lower().replace(" ", "_").replace("+", "with") if ch.isalnum() or ch in "_-")


def _cached(cache: ResultCache, models: CLDMModels, method: str, names: list[str], targets, settings, compute):
    digests = models.digests(names)
    if digests is None or cache.folder is None:
        return compute()
    return cache.get_or_compute(_slug(method), cache_key(method, digests, targets.case_ids, settings), compute)


# ----- Table 1 -----------------------------------------------------------------------------


def segmentation_target(targets: Targets, i: int) -> SegmentationTarget:
    t, ex = targets.trajectories, targets.examples
    row, last = int(ex.target_row[i]), int(ex.last_prior_row[i])
    if t.mask_affine is None:
        raise CLDMEvaluationError("the CT trajectories carry no mask grid (mask_affine): HD95 needs its spacing")
    return SegmentationTarget(
        targets.patients[i], t.masks[row].astype(bool), t.masks[last].astype(bool), int(t.lung_voxels[row]),
        grid_spacing_mm(t.mask_affine[row]),
    )  # fmt: skip


def decode_probabilities(decoder, tokens, rows: int = 8) -> np.ndarray:
    """(M, 1 + N, dim) tokens -> (M, *grid) float32 probabilities, `rows` at a time."""
    import torch

    tokens = torch.as_tensor(tokens)
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], rows):
            out.append(torch.sigmoid(decoder(tokens[start : start + rows].float())[:, 0]).float().numpy())
    return np.concatenate(out)


def _check_grid(probs: np.ndarray, target: SegmentationTarget) -> None:
    if probs.shape[-target.mask.ndim :] != target.mask.shape:
        raise CLDMEvaluationError(
            f"the segmentation decoder writes {tuple(probs.shape[-target.mask.ndim :])} masks, the ingested CT "
            f"masks are {target.mask.shape}: the decoder was trained for another grid (ingest.volume_shape)"
        )


def _arrays(cases: list[CaseScores], prefix: str = "") -> dict[str, np.ndarray]:
    return {
        f"{prefix}mean": np.array([[c.mean_forecast[k] for k in METRICS] for c in cases], np.float64),
        f"{prefix}per_sample": np.array([np.stack([c.per_sample[k] for k in METRICS], -1) for c in cases], np.float64),
    }


def _cases(arrays: dict[str, np.ndarray], prefix: str = "") -> list[CaseScores]:
    return [
        CaseScores(dict(zip(METRICS, map(float, m))), {k: p[:, j] for j, k in enumerate(METRICS)})
        for m, p in zip(arrays[f"{prefix}mean"], arrays[f"{prefix}per_sample"])
    ]


def anchored_case(samples: np.ndarray, prior_prob: np.ndarray, target: SegmentationTarget) -> CaseScores:
    """A forecast anchored to the last prior's true mask (models.mask_anchoring): the mean
    forecast anchors the samples' mean probability, each sample anchors its own."""
    prior = target.last_prior
    mean = mask_metrics(anchored_mask(samples.mean(axis=0), prior_prob, prior), target)
    per = [mask_metrics(anchored_mask(p, prior_prob, prior), target) for p in samples]
    return CaseScores(mean, {k: np.array([x[k] for x in per]) for k in METRICS})


def _model_scores(e, model, decoder, targets: Targets, seg_targets, examples, num_samples, label) -> dict:
    """The model's forecasts decoded alone and anchored to the last prior's mask."""
    cases: list[CaseScores] = []
    anchored: list[CaseScores] = []
    prior_tokens = targets.trajectories.tokens[examples.last_prior_row]
    for idx, forecast in forecast_batches(
        model, targets, examples, num_samples, e.seed, e.inference_steps, e.batch_size, label
    ):
        samples = forecast.samples  # (b, S, 1 + N, dim)
        b, s = samples.shape[:2]
        probs = decode_probabilities(decoder, samples.reshape(b * s, *samples.shape[2:]))
        _check_grid(probs, seg_targets[idx[0]])
        probs = probs.reshape(b, s, *probs.shape[1:])
        prior_probs = decode_probabilities(decoder, prior_tokens[list(idx)])
        cases += [score_case(probs[j], seg_targets[i]) for j, i in enumerate(idx)]
        anchored += [anchored_case(probs[j], prior_probs[j], seg_targets[i]) for j, i in enumerate(idx)]
    return {**_arrays(cases), **_arrays(anchored, "anchored_")}


def segmentation_table(e, models: CLDMModels, targets: Targets, cache: ResultCache) -> Table1:
    """Table 1 on `targets` (module docstring); `e` a CLDMEvaluationConfig."""
    if models.segmentation is None:
        raise CLDMEvaluationError("Table 1 needs the segmentation decoder (stage 'segmentation')")
    seg = [segmentation_target(targets, i) for i in range(len(targets))]
    patients, t = targets.patients, targets.trajectories
    settings = {"num_samples": e.num_samples, "steps": e.inference_steps, "seed": e.seed, "anchored": True}
    scored: dict[str, list[CaseScores]] = {}
    notes: dict[str, str] = {}

    copy = [t.masks[int(r)][None].astype(np.float32) for r in targets.examples.last_prior_row]
    scored[COPY_LAST] = [score_case(c, s) for c, s in zip(copy, seg)]
    notes[COPY_LAST] = "the last prior's true mask; deterministic (std 0)"
    if models.regressor is not None:
        regressor = _cached(cache, models, NO_DIFFUSION, ["regressor", "segmentation"], targets, settings,
                            lambda: _model_scores(e, models.regressor, models.segmentation, targets, seg,
                                                  targets.examples, 1, NO_DIFFUSION))  # fmt: skip
        scored[NO_DIFFUSION] = _cases(regressor)
        notes[NO_DIFFUSION] = "regressor tokens (all priors) -> segmentation decoder; deterministic"
    for k in e.truncated_priors:
        name = cldm_k(k)
        scored[name] = _cases(
            _cached(cache, models, name, ["forecaster", "segmentation"], targets, {**settings, "priors": k},
                    lambda k=k, name=name: _model_scores(e, models.forecaster, models.segmentation, targets, seg,
                                                         targets.truncated(k), e.num_samples, name))
        )  # fmt: skip
        notes[name] = f"the same model, context cut to the {k} most recent prior(s) (fewer where fewer exist)"
    cldm_all = _cached(cache, models, CLDM_ALL, ["forecaster", "segmentation"], targets, {**settings, "priors": "all"},
                       lambda: _model_scores(e, models.forecaster, models.segmentation, targets, seg,
                                             targets.examples, e.num_samples, CLDM_ALL))  # fmt: skip
    scored[CLDM_ALL] = _cases(cldm_all)
    notes[CLDM_ALL] = f"every prior (at most temporal.max_exams = {models.max_priors})"
    # our addition (models/mask_anchoring.py): the same forecasts anchored to the last prior's true mask
    scored[CLDM_ALL_ANCHORED] = _cases(cldm_all, "anchored_")
    notes[CLDM_ALL_ANCHORED] = "the same forecasts: the last prior's true mask edited by the decoded change"
    if models.regressor is not None:
        scored[NO_DIFFUSION_ANCHORED] = _cases(regressor, "anchored_")
        notes[NO_DIFFUSION_ANCHORED] = "the regressor's forecast anchored the same way"
    rows_tokens = t.tokens[targets.examples.target_row]
    bound = decode_probabilities(models.segmentation, rows_tokens)
    _check_grid(bound, seg[0])
    scored[BOUND] = [score_case(p[None], s) for p, s in zip(bound, seg)]
    notes[BOUND] = "segmentation decoder on the target's own (true) tokens"

    rows = [summarise(m, c, patients, e.bootstrap, e.seed) for m, c in scored.items()]
    by = {r.method: r for r in rows}
    difference = paired_difference(by[CLDM_ALL], by[COPY_LAST], "avd", patients, e.bootstrap, e.seed)
    anchored_difference = paired_difference(by[CLDM_ALL_ANCHORED], by[COPY_LAST], "avd", patients, e.bootstrap, e.seed)
    keep = targets.num_priors >= e.ordering_min_priors
    order = [CLDM_ALL, *[cldm_k(k) for k in reversed(e.truncated_priors)]]
    ordering = {m: float(np.nanmean(by[m].per_case["avd"][keep])) if keep.any() else float("nan") for m in order}
    return Table1(
        rows, difference, ordering, int(keep.sum()), len({p for p, k in zip(patients, keep) if k}),
        e.ordering_min_priors, len(targets), len(set(patients)), notes, anchored_difference,
    )  # fmt: skip


# ----- Table 2 -----------------------------------------------------------------------------


def _generate(e, decoder, targets: Targets, tokens_of, with_prior: bool) -> np.ndarray:
    """Reports from `tokens_of(idx)` (B, 1 + N, dim) per batch, with the last prior's tokens."""
    import torch

    t, ex, out = targets.trajectories, targets.examples, []
    for start in range(0, len(targets), e.batch_size):
        idx = np.arange(start, min(len(targets), start + e.batch_size))
        prior = torch.from_numpy(t.tokens[ex.last_prior_row[idx]]) if with_prior else None
        out += decoder.generate(torch.as_tensor(tokens_of(idx)).float(), prior=prior)
    return np.array(out, dtype=str)


def _forecast_means(e, model, targets: Targets, num_samples: int, label: str) -> np.ndarray:
    means = [
        f.mean.float().numpy()
        for _, f in forecast_batches(
            model, targets, targets.examples, num_samples, e.seed, e.inference_steps, e.batch_size, label
        )
    ]
    return np.concatenate(means)


def report_table(e, models: CLDMModels, targets: Targets, labeler, cache: ResultCache) -> Table2:
    """Table 2 on `targets` (module docstring); `labeler` a ReportLabeler."""
    from cohortcast.evaluation.report_metrics import report_statistics

    if models.report is None:
        raise CLDMEvaluationError("Table 2 needs the report decoder (stage 'report')")
    t, ex, patients = targets.trajectories, targets.examples, targets.patients
    use_prior = bool(models.report.cfg.report.use_prior)
    settings = {"num_samples": e.num_samples, "steps": e.inference_steps, "seed": e.seed, "anchored": True}
    references = [t.reports[int(r)] for r in ex.target_row]
    hyps: dict[str, tuple[list[str], bool, str]] = {}
    hyps[COPY_PRIOR] = ([t.reports[int(r)] for r in ex.last_prior_row], True, "the previous exam's report")
    mean: list[np.ndarray] = []

    def cldm_reports(with_prior: bool):
        if not mean:
            mean.append(_forecast_means(e, models.forecaster, targets, e.num_samples, "reports: CLDM"))
        return {"texts": _generate(e, models.report, targets, lambda idx: mean[0][idx], with_prior)}

    for name, with_prior in ((CLDM_PRIOR, True), (CLDM_NO_PRIOR, False)):
        given = with_prior and use_prior
        texts = _cached(cache, models, name, ["forecaster", "report"], targets, {**settings, "prior": given},
                        lambda given=given: cldm_reports(given))["texts"]  # fmt: skip
        note = "mean forecast tokens -> report decoder" + (", with the last prior's tokens" if given else ", no prior")
        if with_prior and not use_prior:
            note += " (the decoder was built without report.use_prior: it takes no prior)"
        hyps[name] = (list(texts), given, note)
    if models.regressor is not None:

        def regressor_reports():
            tokens = _forecast_means(e, models.regressor, targets, 1, "reports: regressor")
            return {"texts": _generate(e, models.report, targets, lambda idx: tokens[idx], use_prior)}

        texts = _cached(cache, models, NO_DIFFUSION_PRIOR, ["regressor", "report"], targets, settings,
                        regressor_reports)["texts"]  # fmt: skip
        hyps[NO_DIFFUSION_PRIOR] = (list(texts), use_prior, "regressor tokens -> report decoder")
    bound = _generate(e, models.report, targets, lambda idx: t.tokens[ex.target_row[idx]], use_prior)
    hyps[BOUND_PRIOR] = (list(bound), use_prior, "the target's own (true) tokens -> report decoder")

    ref_labels = _label(labeler, references)
    stats, rows = {}, []
    for method, (texts, prior, note) in hyps.items():
        stats[method] = report_statistics(texts, references, _label(labeler, texts), ref_labels, uncertain=e.uncertain)
        values, ci = {}, {}
        for k in REPORT_METRICS:
            values[k] = _point(stats[method][k], len(texts))
            ci[k] = _interval(patient_bootstrap, patients, stats[method][k], e.bootstrap, e.seed)
        rows.append(ReportRow(method, prior, values, ci, note))
    differences = []
    for metric in ("change_f1", "bleu4"):
        a, b = stats[CLDM_PRIOR][metric], stats[CLDM_NO_PRIOR][metric]
        pa, pb = _point(a, len(targets)), _point(b, len(targets))
        interval = _interval(paired_bootstrap, patients, a, b, e.bootstrap, e.seed)
        if pa is not None and pb is not None:
            differences.append(ReportDifference(CLDM_PRIOR, CLDM_NO_PRIOR, metric, pa - pb, interval))
    name = type(labeler).__name__
    return Table2(rows, differences, len(targets), len(set(patients)), name, e.uncertain)


def _label(labeler, texts: list[str]):
    many = getattr(labeler, "label_many", None)
    return list(many(texts)) if many else [labeler.label(x) for x in texts]


def _point(statistic, n: int) -> float | None:
    try:
        return float(statistic(np.arange(n)))
    except ValueError:
        return None


def _interval(bootstrap, *args):
    try:
        return bootstrap(*args)
    except ValueError:  # too few patients, or the metric undefined on most resamples
        return None
