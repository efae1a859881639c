"""CheXpert-style labels from chest radiograph reports: the CLDM report evaluation's
"CheXpert F1" needs the same labels extracted from generated and reference reports.

`RuleLabeler` follows the NIH/CheXpert rule labelers (NegBio's mention -> negation ->
uncertainty pipeline) with regular expressions instead of a dependency parse:

1. the report is split into sentences, sentences into clauses (";", "but", "however", ...),
   section headers (FINDINGS:, IMPRESSION:) are dropped;
2. every clause is searched for each label's mention phrases;
3. each mention is classified: *uncertain* when an uncertainty cue ("possible", "may",
   "cannot be excluded", "borderline", ...) is within a few words before it or a
   post-cue ("... cannot be excluded") after it; otherwise *negative* when a negation cue
   ("no", "without", "free of", "resolution of", ...) precedes it or a post-negation cue
   ("... is not seen", "... has resolved", "... no longer") follows it; otherwise
   *positive*. Uncertainty is checked first, so "cannot exclude" is not a negation.
   Heart mentions that are not themselves a finding ("heart size", "cardiac silhouette")
   count only with a descriptor in the clause: enlarged/large (positive, subject to the
   cues), normal/not enlarged (negative) or borderline (uncertain);
4. a label's mentions are combined as CheXpert does: positive if any mention is
   positive, else uncertain if any is uncertain, else negative; no mention = not mentioned.
   "No Finding" is positive when no other label is positive or uncertain.

Change versus a prior exam: a clause's change cues (new/increased/worse ... ->
"worse"; decreased/improved/resolved/no longer ... -> "improved"; stable/unchanged/
persistent/remains ... -> "stable") apply to the labels mentioned in it; an explicit
direction outranks "stable" and the cue nearest the mention wins. A negated mention
carries only an improvement ("has resolved"). Over the whole report the most severe
change stated wins (worse > improved > stable); None when the report states none.

Uncertain labels become binary by the `uncertain` policy (Irvin et al. 2019): "ones"
(U-Ones: uncertain -> 1, the default, as a reader would flag it), "zeros" (U-Zeros:
uncertain -> 0) or "ignore" (None: left out of the metric). Not mentioned -> 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from cohortcast.errors import CohortcastError

POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED = "positive", "negative", "uncertain", "not_mentioned"
IMPROVED, STABLE, WORSE = "improved", "stable", "worse"
NO_FINDING = "No Finding"

# CheXpert observation names; No Finding is derived from the others.
LABELS = (
    NO_FINDING,
    "Lung Opacity",
    "Lung Lesion",
    "Pleural Effusion",
    "Cardiomegaly",
    "Pneumothorax",
    "Edema",
    "Consolidation",
    "Atelectasis",
)

_MENTIONS: dict[str, list[str]] = {
    "Lung Opacity": [
        r"(?<!nodular )opacit(?:y|ies)",
        r"opacification",
        r"reticula(?:r|tion)",
        r"infiltrat(?:e|es|ion|ions)",
        r"air-?\s?space (?:disease|process)",
        r"interstitial (?:markings?|opacit(?:y|ies)|abnormalit(?:y|ies)|disease|changes?|pattern)",
        r"fibros(?:is|es)",
        r"fibrotic",
        r"scarring",
    ],
    "Lung Lesion": [
        r"nodules?",
        r"nodular (?:opacit(?:y|ies)|densit(?:y|ies)|lesions?)",
        r"mass(?:es)?(?! effect)",
        r"(?:lung|pulmonary) lesions?",
        r"tumou?rs?",
        r"neoplasms?",
    ],
    "Pleural Effusion": [r"(?<!pericardial )(?:pleural )?effusions?", r"pleural fluid", r"hydrothorax"],
    "Cardiomegaly": [r"cardiomegaly", r"cardiac enlargement", r"enlarged (?:heart|cardiac silhouette)"],
    "Pneumothorax": [r"pneumothora(?:x|ces)"],
    "Edema": [r"edema", r"vascular congestion"],
    "Consolidation": [r"consolidat(?:ion|ions|ive)"],
    "Atelectasis": [r"atelecta(?:sis|ses|tic)"],
}
# Heart mentions that need a descriptor (step 3 of the module docstring).
_HEART = r"(?:heart|cardiac) (?:size|silhouette|shadow|contours?)|\bheart\b"
_HEART_LARGE = r"enlarge(?:d|ment)|\blarge\b|increased"
_HEART_NORMAL = r"normal|unremarkable|not enlarged"
_HEART_BORDERLINE = r"borderline"

_UNCERTAIN_PRE = (
    r"possibl[ey]|probabl[ey]|likely|\bmay\b|might|could|questionabl[ey]|question of|equivocal|borderline|"
    r"suspect(?:ed)?|suspicious for|concern(?:ing)? for|suggest(?:s|ive|ing|ed)?|"
    r"(?:cannot|can not|can't) (?:exclude|rule out)|rule out|differential|versus|\bvs\b|indeterminate"
)
_UNCERTAIN_POST = (
    r"(?:cannot|can not|can't) be (?:excluded|ruled out)|not (?:be )?(?:excluded|ruled out)|"
    r"(?:is|are) (?:possible|suspected|questioned|likely)|\?"
)
_NEGATION_PRE = (
    r"\bno\b(?!\s+(?:significant\s+|appreciable\s+|interval\s+)*change)(?!\s+longer)|\bnot\b|without|"
    r"negative for|free of|absence of|resolution of|resolved|clearing of|\bnor\b"
)
_NEGATION_POST = (
    r"not (?:seen|identified|present|visuali[sz]ed|evident|demonstrated|appreciated|enlarged)|no longer|"
    r"(?:has|have) (?:resolved|cleared)|resolved|(?:is|are) absent"
)
_WORSE = (
    r"\bnew(?:ly)?\b|increas(?:e|ed|es|ing)|\blarger\b|enlarging|\bworse(?:n|ned|ning)?\b|progress(?:ed|es|ion|ive|ing)?|"
    r"develop(?:ed|ment|ing)|\bgrown\b|\bgrowing\b|\bgrowth\b|more (?:prominent|extensive|conspicuous)"
)
_IMPROVED = (
    r"decreas(?:e|ed|es|ing)|\bsmaller\b|improv(?:ed|es|ing|ement)|resol(?:ved|ving|ution)|no longer|"
    r"clear(?:ed|ing)|less (?:prominent|extensive|conspicuous)|diminish(?:ed|ing)|regress(?:ed|ion)|reduc(?:ed|tion)"
)
_STABLE = (
    r"\bstable\b|unchanged|no (?:significant |appreciable )?(?:interval )?change|\bsimilar\b|persist(?:s|ent|ing|ed)?|"
    r"\bremain(?:s|ed|ing)?\b|again (?:seen|noted|demonstrated)|\bconstant\b"
)
_PRE_WINDOW, _POST_WINDOW = 6, 6  # words between a cue and its mention


def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


_MENTION_RES = {label: [_compile(rf"\b{p}\b") for p in ps] for label, ps in _MENTIONS.items()}
_HEART_RE = _compile(_HEART)
_RES = {
    name: _compile(p)
    for name, p in (
        ("unc_pre", _UNCERTAIN_PRE),
        ("unc_post", _UNCERTAIN_POST),
        ("neg_pre", _NEGATION_PRE),
        ("neg_post", _NEGATION_POST),
        ("large", _HEART_LARGE),
        ("normal", _HEART_NORMAL),
        ("borderline", _HEART_BORDERLINE),
    )
}
_CHANGE_RES = [(WORSE, _compile(_WORSE)), (IMPROVED, _compile(_IMPROVED)), (STABLE, _compile(_STABLE))]
_HEADER = _compile(r"\b(?:findings|impression|comparison|indication|technique|history|exam(?:ination)?)\s*:")
_SENTENCE = re.compile(r"(?<!\d)\.(?!\d)|\n|;")
_CLAUSE = _compile(r",?\s+\b(?:but|however|although|whereas|though)\b,?")


class ReportLabelError(CohortcastError, ValueError):
    """A labeler was configured wrongly (the message names the parameter)."""


@dataclass(frozen=True)
class ReportLabels:
    """One report's labels: `status[label]` in positive/negative/uncertain/not_mentioned,
    `change[label]` in improved/stable/worse or None (no change stated)."""

    status: dict[str, str]
    change: dict[str, str | None] = field(default_factory=dict)


class ReportLabeler(Protocol):
    labels: tuple[str, ...]

    def label(self, report: str) -> ReportLabels: ...


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _clauses(report: str) -> list[str]:
    text = _HEADER.sub(" ", report)
    out = []
    for sentence in _SENTENCE.split(text):
        out.extend(c.strip() for c in _CLAUSE.split(sentence) if c.strip())
    return out


def _near_before(regex: re.Pattern, clause: str, start: int, end: int) -> bool:
    """A cue ending before `start` within the window, or inside [start, end)."""
    for m in regex.finditer(clause):
        if m.start() >= start and m.end() <= end:
            return True
        if m.end() <= start and _words(clause[m.end() : start]) <= _PRE_WINDOW:
            return True
    return False


def _near_after(regex: re.Pattern, clause: str, end: int) -> bool:
    return any(m.start() >= end and _words(clause[end : m.start()]) <= _POST_WINDOW for m in regex.finditer(clause))


def _classify(clause: str, start: int, end: int) -> str:
    if _near_before(_RES["unc_pre"], clause, start, end) or _near_after(_RES["unc_post"], clause, end):
        return UNCERTAIN
    if _near_before(_RES["neg_pre"], clause, start, end) or _near_after(_RES["neg_post"], clause, end):
        return NEGATIVE
    return POSITIVE


def _change(clause: str, start: int, end: int) -> str | None:
    """The clause's change cue nearest the mention; a direction outranks "stable"."""
    for kinds in ((WORSE, IMPROVED), (STABLE,)):
        best = None
        for kind, regex in _CHANGE_RES:
            if kind not in kinds:
                continue
            for m in regex.finditer(clause):
                distance = start - m.end() if m.end() <= start else max(0, m.start() - end)
                if best is None or distance < best[0]:
                    best = (distance, kind)
        if best is not None:
            return best[1]
    return None


def _heart_mentions(clause: str) -> list[tuple[int, int, str]]:
    """(start, end, status) for heart mentions with a descriptor (see the docstring)."""
    out = []
    for m in _HEART_RE.finditer(clause):
        status = None
        large = _RES["large"].search(clause)
        if _RES["borderline"].search(clause):
            status = UNCERTAIN
        elif _RES["normal"].search(clause):
            status = NEGATIVE
        elif large:
            span = (min(m.start(), large.start()), max(m.end(), large.end()))
            status = _classify(clause, *span)
        if status is not None:
            out.append((m.start(), m.end(), status))
    return out


_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, NOT_MENTIONED: 0}
_CHANGE_RANK = {WORSE: 3, IMPROVED: 2, STABLE: 1}


class RuleLabeler:
    """Mention/negation/uncertainty rules (module docstring); `uncertain` maps uncertain
    labels in `binary`: "ones" (U-Ones), "zeros" (U-Zeros) or "ignore" (None)."""

    labels = LABELS

    def __init__(self, uncertain: Literal["ones", "zeros", "ignore"] = "ones"):
        if uncertain not in ("ones", "zeros", "ignore"):
            raise ReportLabelError(f"uncertain: {uncertain!r} is not one of ['ones', 'zeros', 'ignore']")
        self.uncertain = uncertain

    def label(self, report: str) -> ReportLabels:
        status = {label: NOT_MENTIONED for label in LABELS}
        change: dict[str, str | None] = {label: None for label in LABELS}
        for clause in _clauses(report):
            found: list[tuple[str, int, int, str]] = []
            for label, regexes in _MENTION_RES.items():
                for regex in regexes:
                    found.extend(
                        (label, m.start(), m.end(), _classify(clause, m.start(), m.end()))
                        for m in regex.finditer(clause)
                    )
            found.extend(("Cardiomegaly", s, e, st) for s, e, st in _heart_mentions(clause))
            for label, start, end, st in found:
                if _RANK[st] > _RANK[status[label]]:
                    status[label] = st
                ch = _change(clause, start, end)
                if ch is not None and (st != NEGATIVE or ch == IMPROVED):
                    if change[label] is None or _CHANGE_RANK[ch] > _CHANGE_RANK[change[label]]:
                        change[label] = ch
        findings = [label for label in LABELS if label != NO_FINDING]
        if not any(status[label] in (POSITIVE, UNCERTAIN) for label in findings):
            status[NO_FINDING] = POSITIVE
        return ReportLabels(status=status, change=change)

    def label_many(self, reports: Iterable[str]) -> list[ReportLabels]:
        return [self.label(r) for r in reports]

    def binary(self, labels: ReportLabels, names: Sequence[str] | None = None) -> dict[str, int | None]:
        """positive -> 1, negative/not mentioned -> 0, uncertain by the policy."""
        return binary_labels(labels, names or self.labels, self.uncertain)


UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


def binary_labels(labels: ReportLabels, names: Sequence[str], uncertain: str = "ones") -> dict[str, int | None]:
    """positive -> 1, negative/not mentioned -> 0, uncertain -> 1 ("ones"), 0 ("zeros") or
    None ("ignore"); shared by every labeler so the metrics map labels one way."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ReportLabelError(f"uncertain: {uncertain!r} is not one of {list(UNCERTAIN_POLICIES)}")
    mapped = {"ones": 1, "zeros": 0, "ignore": None}[uncertain]
    out: dict[str, int | None] = {}
    for name in names:
        if name not in labels.status:
            raise ReportLabelError(f"label {name!r} is not one the labeler produces ({sorted(labels.status)})")
        st = labels.status[name]
        out[name] = 1 if st == POSITIVE else (mapped if st == UNCERTAIN else 0)
    return out
