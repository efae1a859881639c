"""Report metrics of CLDM's Table 2 (generated vs reference radiograph reports).

Scale: every score is in [0, 1], as the paper's Table 2 prints them (BLEU-4 0.17 is
sacrebleu's 17.0 divided by 100).

- BLEU-4: sacrebleu with its "13a" tokeniser (the WMT standard; pure Python, nothing
  downloaded), default exp smoothing. The table uses *corpus* BLEU (n-gram counts pooled
  over all reports, one brevity penalty), as report-generation papers do; `sentence_bleu4`
  (sacrebleu's sentence score, effective order) is per report, for inspection only.
- ROUGE-L: rouge_score's RougeScorer(["rougeL"]) without stemming (its own lower-casing
  tokeniser; no NLTK data needed), F-measure per report, averaged over reports. A report
  with no alphanumeric token scores 0, even against an identical one.
- CheXpert label F1: both reports labelled by one labeler (RuleLabeler, or CheXbertLabeler
  on real data); statuses made binary by `binary_labels` (positive -> 1, negative and not
  mentioned -> 0, uncertain by the policy: U-Ones by default). Per label F1 (scikit-learn),
  micro F1 over all (report, label) decisions (the headline "CheXpert F1") and macro F1
  over labels. A label positive in neither the references nor the predictions has no F1
  (None) and is left out of the macro; it adds nothing to the micro. So scoring over
  CheXpert's 14, the rule labeler's 9 or the generator's 5 labels gives the same numbers
  unless a method writes a label outside the vocabulary. Under "ignore" a (report, label)
  pair uncertain on either side is left out.
- Change-label F1: per (report, finding) pair the change stated against the prior exam
  (improved / stable / worse, from the labeler's change cues; "none" when no change is
  stated). F1 per change class, macro over the three (the table's value) and micro. A
  predicted change where the reference states none is a false positive of that class, a
  missed one a false negative; a class present on neither side is None and left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cohortcast.errors import CohortcastError
from cohortcast.evaluation.report_labeler import IMPROVED, NO_FINDING, STABLE, WORSE, ReportLabels, binary_labels

CHANGES = (IMPROVED, STABLE, WORSE)
NO_CHANGE = "none"


class ReportMetricError(CohortcastError, ValueError):
    """Report lists that cannot be scored together (the message says why)."""


def _texts(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references) or not references:
        raise ReportMetricError(f"{len(hypotheses)} generated reports for {len(references)} reference reports")
    if not all(isinstance(t, str) for t in hypotheses + references):
        raise ReportMetricError("reports must be strings")
    return hypotheses, references


def _unit(score: float) -> float:
    """sacrebleu's 0..100 -> 0..1, clipped (its identical-text score is 100 + 4e-14)."""
    return min(1.0, max(0.0, score / 100.0))


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] (one reference per report)."""
    from sacrebleu.metrics import BLEU

    hypotheses, references = _texts(hypotheses, references)
    return _unit(BLEU(tokenize="13a").corpus_score(hypotheses, [references]).score)


def sentence_bleu4(hypothesis: str, reference: str) -> float:
    """sacrebleu's smoothed sentence BLEU-4 of one report in [0, 1] (not the table's)."""
    from sacrebleu.metrics import BLEU

    (hypothesis,), (reference,) = _texts([hypothesis], [reference])
    return _unit(BLEU(tokenize="13a", effective_order=True).sentence_score(hypothesis, [reference]).score)


def bleu_signature() -> str:
    """sacrebleu's signature of the table's BLEU settings, for the report's footnote."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="13a")
    bleu.corpus_score(["a"], [["a"]])  # the signature needs the reference count
    return bleu.get_signature().format()


def rouge_l_per_report(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F-measure of each report (n,)."""
    from rouge_score.rouge_scorer import RougeScorer

    hypotheses, references = _texts(hypotheses, references)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    # score(target, prediction): the reference comes first.
    return np.array([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)])


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over reports."""
    return float(rouge_l_per_report(hypotheses, references).mean())


@dataclass(frozen=True)
class LabelF1:
    per_label: dict[str, float | None]  # None: positive on neither side
    micro: float | None
    macro: float | None
    uncertain: str


@dataclass(frozen=True)
class ChangeF1:
    per_change: dict[str, float | None]  # improved / stable / worse; None: on neither side
    macro: float | None
    micro: float | None
    n_pairs: int  # (report, finding) pairs compared


def _labels(references: Sequence[ReportLabels], predictions: Sequence[ReportLabels]) -> None:
    if len(references) != len(predictions) or not references:
        raise ReportMetricError(f"{len(predictions)} labelled generated reports for {len(references)} references")


def _f1(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    from sklearn.metrics import f1_score

    if not (y_true.any() or y_pred.any()):
        return None
    return float(f1_score(y_true, y_pred, zero_division=0))


def _binary_matrix(labelled: Sequence[ReportLabels], names: list[str], uncertain: str) -> np.ndarray:
    """(n, labels) of 1 / 0 / -1 (-1: uncertain under "ignore", left out)."""
    rows = [binary_labels(lab, names, uncertain) for lab in labelled]
    return np.array([[-1 if row[n] is None else row[n] for n in names] for row in rows], np.int8).reshape(
        -1, len(names)
    )


def label_f1(
    references: Sequence[ReportLabels],
    predictions: Sequence[ReportLabels],
    names: Sequence[str] | None = None,
    uncertain: str = "ones",
) -> LabelF1:
    """CheXpert-style label F1 of generated reports' labels against the references' (module
    docstring); `names` defaults to every label the references carry."""
    from sklearn.metrics import f1_score

    _labels(references, predictions)
    names = list(names or references[0].status)
    if not names:
        raise ReportMetricError("label F1 needs at least one label name")
    truth, guess = _binary_matrix(references, names, uncertain), _binary_matrix(predictions, names, uncertain)
    keep = (truth >= 0) & (guess >= 0)
    truth, guess = truth == 1, guess == 1
    if keep.all():  # one scikit-learn call for all labels (the bootstrap calls this often)
        scores = f1_score(truth, guess, average=None, zero_division=0)
        defined = truth.any(0) | guess.any(0)
        per_label = {n: float(s) if d else None for n, s, d in zip(names, scores, defined)}
    else:
        per_label = {n: _f1(truth[keep[:, j], j], guess[keep[:, j], j]) for j, n in enumerate(names)}
    values = [v for v in per_label.values() if v is not None]
    micro = _f1(truth[keep], guess[keep])
    return LabelF1(per_label, micro, float(np.mean(values)) if values else None, uncertain)


def _change_names(references: Sequence[ReportLabels], names: Sequence[str] | None) -> list[str]:
    out = [n for n in (names or references[0].change) if n != NO_FINDING]
    if not out:
        raise ReportMetricError("change-label F1 needs at least one finding with a change slot")
    return out


def _change_matrix(labelled: Sequence[ReportLabels], names: list[str], side: str) -> np.ndarray:
    """(n, findings) of improved / stable / worse / "none"."""
    missing = sorted({n for lab in labelled for n in names if n not in lab.change})
    if missing:
        raise ReportMetricError(f"{side} labels carry no change for {missing}")
    return np.array([[lab.change[n] or NO_CHANGE for n in names] for lab in labelled], dtype=object).reshape(
        -1, len(names)
    )


def change_f1(
    references: Sequence[ReportLabels], predictions: Sequence[ReportLabels], names: Sequence[str] | None = None
) -> ChangeF1:
    """Change-label F1 over (report, finding) pairs (module docstring); `names` defaults to
    every finding the references carry a change slot for, "No Finding" excluded."""
    from sklearn.metrics import f1_score

    _labels(references, predictions)
    names = _change_names(references, names)
    y_true = list(_change_matrix(references, names, "reference").ravel())
    y_pred = list(_change_matrix(predictions, names, "generated").ravel())
    present = [c for c in CHANGES if c in y_true or c in y_pred]
    per = dict.fromkeys(CHANGES)
    micro = macro = None
    if present:
        scores = f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
        per.update({c: float(s) for c, s in zip(present, scores)})
        macro = float(np.mean(scores))
        micro = float(f1_score(y_true, y_pred, labels=present, average="micro", zero_division=0))
    return ChangeF1(per, macro, micro, len(y_true))


Statistic = Callable[[np.ndarray], float]


def _counts(truth: np.ndarray, guess: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per report and class, (TP, FP, FN) over the kept decisions: (n, classes, 3)."""
    return np.stack([truth & guess & keep, ~truth & guess & keep, truth & ~guess & keep], axis=-1).astype(np.int64)


def _f1_of_counts(counts: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN) per row of (k, 3) counts; NaN where all three are 0 (no
    positive on either side), as label_f1 / change_f1 leave such a class out."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def _defined(value: float) -> float:
    if np.isnan(value):
        raise ValueError("F1 undefined on this resample")  # patient_bootstrap skips it
    return float(value)


def report_statistics(
    hypotheses: Sequence[str],
    references: Sequence[str],
    generated_labels: Sequence[ReportLabels],
    reference_labels: Sequence[ReportLabels],
    names: Sequence[str] | None = None,
    uncertain: str = "ones",
) -> dict[str, Statistic]:
    """Each Table-2 value as a function of report indices, for evaluation.metrics'
    patient_bootstrap / paired_bootstrap: corpus BLEU is recomputed on each resample;
    label and change F1 are sums of per-report (TP, FP, FN) counts, so a resample adds
    counts instead of re-running scikit-learn (equal to label_f1().micro and
    change_f1().macro on all reports, which the tests check). Undefined F1 raises
    ValueError, so that resample is skipped."""
    hypotheses, references = _texts(hypotheses, references)
    _labels(reference_labels, generated_labels)
    if len(reference_labels) != len(references):
        raise ReportMetricError(f"{len(reference_labels)} labelled reports for {len(references)} reports")
    rouge = rouge_l_per_report(hypotheses, references)
    label_names = list(names or reference_labels[0].status)
    if not label_names:
        raise ReportMetricError("label F1 needs at least one label name")
    truth = _binary_matrix(reference_labels, label_names, uncertain)
    guess = _binary_matrix(generated_labels, label_names, uncertain)
    label_counts = _counts(truth == 1, guess == 1, (truth >= 0) & (guess >= 0)).sum(axis=1)  # (n, 3) pooled
    change_names = _change_names(reference_labels, names)
    true_change = _change_matrix(reference_labels, change_names, "reference")
    pred_change = _change_matrix(generated_labels, change_names, "generated")
    change_counts = np.stack(
        [_counts(true_change == c, pred_change == c, np.ones_like(true_change, bool)).sum(axis=1) for c in CHANGES],
        axis=1,
    )  # (n, 3 classes, 3)

    def pick(seq, idx):
        return [seq[i] for i in idx]

    def macro(counts: np.ndarray) -> float:
        f1 = _f1_of_counts(counts)
        return float(np.nanmean(f1)) if not np.isnan(f1).all() else float("nan")

    return {
        "bleu4": lambda idx: bleu4(pick(hypotheses, idx), pick(references, idx)),
        "rouge_l": lambda idx: float(rouge[idx].mean()),
        "label_f1": lambda idx: _defined(float(_f1_of_counts(label_counts[idx].sum(0)))),
        "change_f1": lambda idx: _defined(macro(change_counts[idx].sum(0))),
    }
