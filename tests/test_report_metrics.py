"""CLDM Table-2 report metrics (evaluation.report_metrics): BLEU-4 / ROUGE-L identities and
scale, CheXpert-style label F1 with the uncertain policy, change-label F1 on a hand-built
set, agreement with the synthetic generator's own labels, and the patient bootstrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cohortcast.evaluation.metrics import paired_bootstrap, patient_bootstrap
from cohortcast.evaluation.report_labeler import ReportLabelError, ReportLabels, RuleLabeler
from cohortcast.evaluation.report_metrics import (
    ReportMetricError,
    bleu4,
    bleu_signature,
    change_f1,
    label_f1,
    report_statistics,
    rouge_l,
    sentence_bleu4,
)

ROOT = Path(__file__).resolve().parents[1]
REPORTS = [
    "FINDINGS: Small left pleural effusion. Heart size is normal.\nIMPRESSION: Small left pleural effusion.",
    "FINDINGS: No pleural effusion. Enlarged cardiac silhouette.\nIMPRESSION: Cardiomegaly.",
    "FINDINGS: The lungs are clear.\nIMPRESSION: No acute cardiopulmonary process.",
]


def test_bleu_and_rouge_identities_on_the_papers_0_to_1_scale():
    import sacrebleu

    assert bleu4(REPORTS, REPORTS) == 1.0 and rouge_l(REPORTS, REPORTS) == 1.0
    assert sentence_bleu4(REPORTS[0], REPORTS[0]) == 1.0
    assert bleu4(["alpha beta gamma delta epsilon"], ["one two three four five"]) == 0.0
    assert rouge_l(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    hyps = ["No pleural effusion. The heart is enlarged.", "Small effusion on the left side."]
    refs = ["No pleural effusion. The heart size is enlarged.", "Small left pleural effusion."]
    assert bleu4(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score / 100)
    assert 0 < bleu4(hyps, refs) < 1
    # LCS "no pleural effusion" = 3 of 3 generated / 6 reference tokens: F = 2 / 3
    assert rouge_l(["No pleural effusion."], ["No pleural effusion, heart is large."]) == pytest.approx(2 / 3)
    assert "tok:13a" in bleu_signature()
    with pytest.raises(ReportMetricError, match="2 generated reports for 1 reference"):
        bleu4(["a", "b"], ["a"])


def test_label_f1_is_one_for_identical_reports_and_drops_when_a_finding_flips():
    labeler = RuleLabeler()
    refs = labeler.label_many(REPORTS)
    same = label_f1(refs, refs)
    assert same.micro == 1.0 and same.macro == 1.0
    assert same.per_label["Pneumothorax"] is None  # positive on neither side: no F1, not in the macro
    flipped = labeler.label_many(["No pleural effusion. Heart size is normal.", *REPORTS[1:]])
    f1 = label_f1(refs, flipped)
    # effusion missed (FN) and No Finding claimed (FP); cardiomegaly and No Finding of report 3 hit
    assert f1.micro == pytest.approx(2 / 3)
    assert f1.per_label["Pleural Effusion"] == 0.0 and f1.per_label["Cardiomegaly"] == 1.0
    assert f1.per_label["No Finding"] == pytest.approx(2 / 3)
    assert f1.macro == pytest.approx((0 + 1 + 2 / 3) / 3)
    # the same numbers over the generator's five labels: absent labels add nothing
    five = ("No Finding", "Lung Opacity", "Lung Lesion", "Pleural Effusion", "Cardiomegaly")
    assert label_f1(refs, flipped, five).micro == f1.micro


def test_the_uncertain_policy_maps_uncertain_findings():
    labeler = RuleLabeler()
    (ref,) = labeler.label_many(["Small left pleural effusion."])
    (pred,) = labeler.label_many(["Possible small left pleural effusion."])
    assert label_f1([ref], [pred], uncertain="ones").micro == 1.0  # U-Ones: a reader would flag it
    assert label_f1([ref], [pred], uncertain="zeros").micro == 0.0
    ignored = label_f1([ref], [pred], uncertain="ignore")
    assert ignored.per_label["Pleural Effusion"] is None and ignored.micro is None
    with pytest.raises(ReportLabelError, match="uncertain: 'maybe'"):
        label_f1([ref], [pred], uncertain="maybe")
    with pytest.raises(ReportLabelError, match="'Fracture' is not one the labeler produces"):
        label_f1([ref], [pred], names=["Fracture"])


def _labels(**change) -> ReportLabels:
    return ReportLabels(
        {"No Finding": "not_mentioned", "A": "positive", "B": "positive"}, {"No Finding": None, **change}
    )


def test_change_label_f1_on_a_hand_built_set():
    refs = [_labels(A="worse", B=None), _labels(A="stable", B="improved"), _labels(A=None, B="worse")]
    preds = [_labels(A="worse", B=None), _labels(A="worse", B="improved"), _labels(A=None, B=None)]
    f1 = change_f1(refs, preds)
    # worse: TP 1, FP 1, FN 1 -> 0.5; stable: FN 1 -> 0; improved: TP 1 -> 1
    assert f1.per_change == {"improved": 1.0, "stable": 0.0, "worse": 0.5}
    assert f1.macro == pytest.approx(0.5) and f1.n_pairs == 6  # No Finding carries no change
    assert f1.micro == pytest.approx(4 / 7)  # TP 2, FP 1, FN 2
    assert change_f1(refs, refs).macro == 1.0
    none = change_f1([_labels(A=None, B=None)], [_labels(A=None, B=None)])
    assert none.macro is None and none.per_change == {"improved": None, "stable": None, "worse": None}


def test_rule_labels_match_the_generators_truth_through_the_metrics():
    """Labeler vs generator labels: scoring the labeler's reading of the synthetic reports
    against the generator's own statuses and changes gives F1 = 1 (debug cohort, 8 patients)."""
    from cohortcast.config import load_config
    from cohortcast.data.synthetic.plan import plan_patient

    cfg = load_config(ROOT / "jobs" / "configs" / "cldm_debug.yaml").synth
    reports = [r for i in range(8) for r in plan_patient(cfg, i).radiograph_reports()]
    truth = [ReportLabels(dict(r.status), dict(r.change)) for r in reports]
    read = RuleLabeler().label_many(r.text for r in reports)
    names = list(truth[0].status)
    assert label_f1(truth, read, names).micro == 1.0
    changes = change_f1(truth, read, names)
    assert changes.macro == 1.0 and changes.n_pairs == 4 * len(reports)


def test_report_statistics_bootstrap_contains_the_point_and_a_method_minus_itself_is_zero():
    labeler = RuleLabeler()
    rng = np.random.default_rng(0)
    pool = [*REPORTS, "New small left pleural effusion.", "Stable cardiomegaly. Effusion has resolved."]
    refs = [pool[i] for i in rng.integers(0, 5, 12)]
    hyps = [pool[i] if rng.random() < 0.6 else "Heart size is normal. No effusion." for i in rng.integers(0, 5, 12)]
    stats = report_statistics(hyps, refs, labeler.label_many(hyps), labeler.label_many(refs))
    patients = [f"p{i // 2}" for i in range(12)]
    everything = np.arange(12)
    for name, stat in stats.items():
        ci = patient_bootstrap(patients, stat, n_boot=100, seed=1)
        assert ci.low <= stat(everything) <= ci.high, name
        same = paired_bootstrap(patients, stat, stat, n_boot=50)
        assert (same.low, same.high) == (0.0, 0.0), name
    assert stats["bleu4"](everything) == pytest.approx(bleu4(hyps, refs))
    assert stats["rouge_l"](everything) == pytest.approx(rouge_l(hyps, refs))
    # the counting statistics equal scikit-learn's values, on all reports and on a resample
    for idx in (everything, rng.integers(0, 12, 12)):
        h_lab, r_lab = labeler.label_many([hyps[i] for i in idx]), labeler.label_many([refs[i] for i in idx])
        assert stats["label_f1"](idx) == pytest.approx(label_f1(r_lab, h_lab).micro)
        assert stats["change_f1"](idx) == pytest.approx(change_f1(r_lab, h_lab).macro)
