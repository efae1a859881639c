"""The rule labeler (evaluation.report_labeler): CheXpert-style labels and change labels
from radiograph reports. It must read back the synthetic cohort's own findings exactly
(the CLDM report metrics rest on it) and handle negation/uncertainty edge cases written
by hand, independently of the generator's templates."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

from cohortcast.config import load_config
from cohortcast.data.synthetic.plan import plan_patient
from cohortcast.evaluation.report_labeler import (
    LABELS,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
    ReportLabelError,
    RuleLabeler,
)

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("No Finding", "Lung Opacity", "Lung Lesion", "Pleural Effusion", "Cardiomegaly")


def test_labeler_recovers_the_generators_findings_exactly():
    """Every report of the CLDM debug cohort (120 patients, ~650 reports; the trend model's
    fractions need no pixels): status and change of all five labels, 100%."""
    cfg = load_config(ROOT / "jobs" / "configs" / "cldm_debug.yaml").synth
    labeler = RuleLabeler()
    statuses, changes, mismatches, n = Counter(), Counter(), [], 0
    for index in range(cfg.patients):
        for r in plan_patient(cfg, index).radiograph_reports():
            got = labeler.label(r.text)
            n += 1
            for label in GENERATED:
                statuses[label, r.status[label]] += 1
                changes[label, r.change[label]] += 1
                if (got.status[label], got.change[label]) != (r.status[label], r.change[label]):
                    mismatches.append(
                        (label, r.status[label], r.change[label], got.status[label], got.change[label], r.text)
                    )
    assert not mismatches, f"{len(mismatches)} of {n * len(GENERATED)}: {mismatches[:3]}"
    assert n >= 120 * 4
    # The cohort exercises every status and every change direction the metrics need.
    for label in ("Lung Opacity", "Lung Lesion", "Pleural Effusion", "Cardiomegaly"):
        for status in (POSITIVE, NEGATIVE, UNCERTAIN):
            assert statuses[label, status] > 0, (label, status)
    assert statuses["No Finding", POSITIVE] > 0 and statuses["Lung Lesion", NOT_MENTIONED] > 0
    for change in ("improved", "stable", "worse"):
        assert changes["Pleural Effusion", change] >= 20, change
        assert changes["Lung Opacity", change] > 0 and changes["Lung Lesion", change] > 0, change


@pytest.mark.parametrize(
    "text, label, status, change",
    [
        ("No pleural effusion or pneumothorax.", "Pleural Effusion", NEGATIVE, None),
        ("No pleural effusion or pneumothorax.", "Pneumothorax", NEGATIVE, None),
        ("There is no evidence of focal consolidation or effusion.", "Pleural Effusion", NEGATIVE, None),
        ("The lungs are clear without focal opacity.", "Lung Opacity", NEGATIVE, None),
        ("Possible small left pleural effusion.", "Pleural Effusion", UNCERTAIN, None),
        ("A small left pleural effusion cannot be excluded.", "Pleural Effusion", UNCERTAIN, None),
        ("Cannot exclude a small right effusion.", "Pleural Effusion", UNCERTAIN, None),
        ("Can not exclude a small left pleural effusion.", "Pleural Effusion", UNCERTAIN, None),  # not a negation
        ("It is not possible to exclude a small effusion.", "Pleural Effusion", UNCERTAIN, None),
        ("Pleural effusion is not seen.", "Pleural Effusion", NEGATIVE, None),
        ("The previously described nodule is not identified.", "Lung Lesion", NEGATIVE, None),
        (
            "Small bilateral effusions, likely layering.",
            "Pleural Effusion",
            POSITIVE,
            None,
        ),  # "likely" scopes over layering
        ("Moderate right pleural effusion.", "Pleural Effusion", POSITIVE, None),
        ("No pneumothorax; small left pleural effusion.", "Pleural Effusion", POSITIVE, None),
        ("No pneumothorax, but a small left effusion is present.", "Pleural Effusion", POSITIVE, None),
        ("Interval increase in the right pleural effusion.", "Pleural Effusion", POSITIVE, "worse"),
        ("The left pleural effusion has resolved.", "Pleural Effusion", NEGATIVE, "improved"),
        ("Resolution of the previously seen effusion.", "Pleural Effusion", NEGATIVE, "improved"),
        ("No change in the small left pleural effusion.", "Pleural Effusion", POSITIVE, "stable"),
        ("No new pleural effusion.", "Pleural Effusion", NEGATIVE, None),
        ("Pericardial effusion.", "Pleural Effusion", NOT_MENTIONED, None),
        ("Heart size is normal.", "Cardiomegaly", NEGATIVE, None),
        ("The heart is not enlarged.", "Cardiomegaly", NEGATIVE, None),
        ("No cardiomegaly.", "Cardiomegaly", NEGATIVE, None),
        ("Mild cardiomegaly.", "Cardiomegaly", POSITIVE, None),
        ("The cardiac silhouette is moderately enlarged, unchanged.", "Cardiomegaly", POSITIVE, "stable"),
        ("The heart may be mildly enlarged.", "Cardiomegaly", UNCERTAIN, None),
        ("Borderline heart size.", "Cardiomegaly", UNCERTAIN, None),
        ("Heart size is stable.", "Cardiomegaly", NOT_MENTIONED, None),  # no descriptor: not a finding
        ("No acute cardiopulmonary process.", "Cardiomegaly", NOT_MENTIONED, None),
        ("A 2.5 cm mass in the right upper lobe, increased in size.", "Lung Lesion", POSITIVE, "worse"),
        ("No suspicious pulmonary nodule.", "Lung Lesion", NEGATIVE, None),
        ("Nodular opacity at the left base.", "Lung Lesion", POSITIVE, None),
        ("Nodular opacity at the left base.", "Lung Opacity", NOT_MENTIONED, None),
        ("Bibasilar reticular opacities have decreased.", "Lung Opacity", POSITIVE, "improved"),
        ("Patchy opacity, possibly atelectasis.", "Lung Opacity", POSITIVE, None),
        ("Patchy opacity, possibly atelectasis.", "Atelectasis", UNCERTAIN, None),
        ("Right basilar opacity concerning for pneumonia.", "Lung Opacity", POSITIVE, None),
        ("Findings suggestive of mild interstitial edema.", "Edema", UNCERTAIN, None),
    ],
)
def test_hand_written_negation_and_uncertainty(text, label, status, change):
    got = RuleLabeler().label("FINDINGS: " + text)
    assert (got.status[label], got.change[label]) == (status, change)


def test_no_finding_and_sections():
    labeler = RuleLabeler()
    clean = labeler.label("FINDINGS: Heart size is normal. No pleural effusion.\nIMPRESSION: No acute process.")
    assert clean.status["No Finding"] == POSITIVE
    sick = labeler.label("FINDINGS: Heart size is normal.\nIMPRESSION: Possible trace right pleural effusion.")
    assert sick.status["No Finding"] == NOT_MENTIONED and sick.status["Pleural Effusion"] == UNCERTAIN
    # Positive anywhere outranks uncertain and negative mentions elsewhere (CheXpert aggregation).
    mixed = labeler.label("FINDINGS: Possible left effusion.\nIMPRESSION: Left pleural effusion. No right effusion.")
    assert mixed.status["Pleural Effusion"] == POSITIVE


def test_uncertain_policy_maps_to_binary():
    report = RuleLabeler().label("FINDINGS: Possible small left pleural effusion. Mild cardiomegaly.")
    names = ["Pleural Effusion", "Cardiomegaly", "Lung Lesion"]
    assert RuleLabeler("ones").binary(report, names) == {"Pleural Effusion": 1, "Cardiomegaly": 1, "Lung Lesion": 0}
    assert RuleLabeler("zeros").binary(report, names) == {"Pleural Effusion": 0, "Cardiomegaly": 1, "Lung Lesion": 0}
    assert RuleLabeler("ignore").binary(report, names)["Pleural Effusion"] is None
    assert set(RuleLabeler().binary(report)) == set(LABELS)
    with pytest.raises(ReportLabelError, match="uncertain"):
        RuleLabeler("maybe")


def test_labeler_does_not_read_the_generator():
    """Independent rules: a labeler that imported the generator's templates would only
    prove they agree with themselves."""
    source = ROOT / "platform" / "cohortcast" / "evaluation" / "report_labeler.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [m for m in imported if m.startswith("cohortcast.data")], imported
