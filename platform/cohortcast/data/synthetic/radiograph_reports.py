"""What each exam's chest radiograph shows, and its report in CheXpert vocabulary (the CLDM
report-generation target).

Per exam the truth is a `ChestExam`: the cardiothoracic ratio (fixed per patient), a
pleural effusion that appears, grows, shrinks and resolves between exams (a Markov chain:
none / trace / small / moderate), the fibrotic fraction of the lung (reticular opacity)
and the largest nodule (a lung lesion above a visible size). Each maps to a CheXpert
status with thresholds (below), so the labels follow what the phantom shows; a borderline
finding is reported with uncertainty ("Possible trace left pleural effusion."). Against the
prior exam every finding present at either exam gets a change statement (new / increased /
decreased / resolved / unchanged), so improvement, stability and worsening all occur.
Phrasing varies (a seeded choice among equivalent sentences); `report()` returns the text
and its truth: the status of every label and the change of every finding it compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohortcast.data.synthetic.clinical import Nodule

POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED = "positive", "negative", "uncertain", "not_mentioned"
IMPROVED, STABLE, WORSE = "improved", "stable", "worse"
NO_FINDING, OPACITY, LESION, EFFUSION, CARDIOMEGALY = (
    "No Finding",
    "Lung Opacity",
    "Lung Lesion",
    "Pleural Effusion",
    "Cardiomegaly",
)
LABELS = (NO_FINDING, OPACITY, LESION, EFFUSION, CARDIOMEGALY)

# Thresholds: (uncertain from, positive from).
CTR_LEVELS = (0.50, 0.53)  # cardiothoracic ratio; > 0.5 is the textbook cardiomegaly
FIBROSIS_LEVELS = (0.03, 0.06)  # fraction of lung
LESION_LEVELS = (8.0, 10.0)  # long diameter, mm: smaller nodules are not seen on a radiograph
EFFUSION_LEVELS = (1, 2)  # 1 trace (uncertain), 2 small, 3 moderate
EFFUSION_HEIGHT = {0: 0.0, 1: 0.10, 2: 0.17, 3: 0.27}  # fluid level, fraction of the lung's height
FIBROSIS_CHANGE = 0.015  # fraction of lung: smaller changes read as unchanged
LESION_CHANGE_MM = 2.0


@dataclass(frozen=True)
class ChestExam:
    ctr: float
    effusion: int  # 0 none, 1 trace, 2 small, 3 moderate
    effusion_side: str  # "left" | "right" | "bilateral"
    fibrosis: float  # fibrotic fraction of the lung
    lesion_id: str | None  # the largest nodule's id
    lesion_mm: float  # its long diameter (0 without nodules)
    lesion_zone: str  # e.g. "right lower zone"


def draw_ctr(rng: np.random.Generator, cardiomegaly_fraction: float) -> float:
    enlarged = rng.random() < cardiomegaly_fraction
    normal, large = float(rng.uniform(0.38, 0.49)), float(rng.uniform(0.50, 0.62))
    return large if enlarged else normal


def draw_effusions(rng: np.random.Generator, n: int, onset: float, resolve: float) -> list[tuple[int, str]]:
    """(severity, side) per exam. Every exam makes the same draws, so streams stay aligned."""
    state, side, out = 0, "left", []
    for _ in range(n):
        u, severity = rng.random(), int(rng.integers(1, 4))
        new_side, step = str(rng.choice(["left", "right", "bilateral"], p=[0.4, 0.35, 0.25])), int(rng.integers(-1, 2))
        if state == 0:
            if u < onset:
                state, side = severity, new_side
        elif u < resolve:
            state = 0
        else:
            state = int(np.clip(state + step, 1, 3))
        out.append((state, side))
    return out


def lesion_zone(nodule: Nodule) -> str:
    rel_z = float(nodule.rel_position[2])  # 0 = base, 1 = apex of the lung's box
    level = "lower" if rel_z < 0.4 else ("mid" if rel_z < 0.65 else "upper")
    return f"{nodule.side} {level} zone"


def largest_nodule(nodules: list[Nodule], k: int) -> tuple[str | None, float, str]:
    if not nodules:
        return None, 0.0, ""
    nod = max(nodules, key=lambda n: n.states[k].long_mm)
    return nod.nodule_id, float(nod.states[k].long_mm), lesion_zone(nod)


def _level(value: float, levels: tuple[float, float]) -> str:
    return POSITIVE if value >= levels[1] else (UNCERTAIN if value >= levels[0] else NEGATIVE)


def statuses(exam: ChestExam) -> dict[str, str]:
    """The finding each exam shows (before the mention choice: negatives may go unmentioned)."""
    return {
        OPACITY: _level(exam.fibrosis, FIBROSIS_LEVELS),
        LESION: _level(exam.lesion_mm, LESION_LEVELS),
        EFFUSION: _level(exam.effusion, EFFUSION_LEVELS),
        CARDIOMEGALY: _level(exam.ctr, CTR_LEVELS),
    }


def _direction(delta: float, threshold: float) -> str:
    return WORSE if delta >= threshold else (IMPROVED if delta <= -threshold else STABLE)


def changes(prev: ChestExam, cur: ChestExam, nodules: list[Nodule], k: int) -> dict[str, str | None]:
    """Change of every finding present (not negative) at either exam; None otherwise."""
    now, before = statuses(cur), statuses(prev)
    out: dict[str, str | None] = {}
    for label in (OPACITY, LESION, EFFUSION, CARDIOMEGALY):
        if now[label] == NEGATIVE and before[label] == NEGATIVE:
            out[label] = None
        elif before[label] == NEGATIVE:
            out[label] = WORSE  # new
        elif now[label] == NEGATIVE:
            out[label] = IMPROVED  # resolved / no longer seen
        elif label == OPACITY:
            out[label] = _direction(cur.fibrosis - prev.fibrosis, FIBROSIS_CHANGE)
        elif label == LESION:
            # The same nodule's size at the prior exam (the largest may have changed).
            nod = next(n for n in nodules if n.nodule_id == cur.lesion_id)
            out[label] = _direction(nod.states[k].long_mm - nod.states[k - 1].long_mm, LESION_CHANGE_MM)
        elif label == EFFUSION:
            out[label] = _direction(cur.effusion - prev.effusion, 1)
        else:
            out[label] = _direction(cur.ctr - prev.ctr, 0.02)
    return out


# ---------------------------------------------------------------- phrasing


def _effusion_words(exam: ChestExam) -> tuple[str, str]:
    side = exam.effusion_side
    noun = "pleural effusions" if side == "bilateral" else "pleural effusion"
    return side, noun


def _cardiac(exam: ChestExam, st: str, change: str | None, pick) -> tuple[str, str | None]:
    if st == NEGATIVE:
        return pick(
            ["Heart size is normal.", "The cardiac silhouette is within normal limits.", "Normal heart size."]
        ), None
    if st == UNCERTAIN:
        if change is None:
            return pick(
                ["Borderline heart size.", "The heart size is borderline.", "Possible mild cardiomegaly."]
            ), None
        return pick(["Borderline heart size, unchanged.", "Heart size remains borderline."]), "Borderline heart size."
    degree = "mild" if exam.ctr < 0.56 else ("moderate" if exam.ctr < 0.6 else "marked")
    if change is None:
        text = pick([f"{degree.capitalize()} cardiomegaly.", f"The heart is {degree}ly enlarged."])
        return text, f"{degree.capitalize()} cardiomegaly."
    text = pick([f"Stable {degree} cardiomegaly.", f"{degree.capitalize()} cardiomegaly is unchanged."])
    return text, f"Stable {degree} cardiomegaly."


def _effusion(cur: ChestExam, prev: ChestExam | None, st: str, change: str | None, pick, mention_negative: bool):
    side, noun = _effusion_words(cur)
    if st == NEGATIVE:
        if change == IMPROVED:
            pside, pnoun = _effusion_words(prev)
            verb = "have" if pside == "bilateral" else "has"
            text = pick(
                [
                    f"The previously seen {pside} {pnoun} {verb} resolved.",
                    f"Interval resolution of the {pside} {pnoun}.",
                    f"The {pside} {pnoun} {'are' if pside == 'bilateral' else 'is'} no longer seen.",
                ]
            )
            return text, f"Resolved {pside} {pnoun}."
        if not mention_negative:
            return None, None
        return pick(
            ["No pleural effusion.", "No pleural effusion or pneumothorax.", "There is no pleural effusion."]
        ), None
    if st == UNCERTAIN:
        base = f"trace {side} {noun}"
        a, be = ("", "are") if side == "bilateral" else ("A ", "is")
        text = {
            None: pick([f"Possible {base}.", f"{a}{base} cannot be excluded.".capitalize()]),
            WORSE: pick([f"Possible new {base}.", f"{a}new {base} {be} possible.".capitalize()]),
            IMPROVED: f"Possible {base}, decreased from the prior study.",
            STABLE: f"Possible {base}, unchanged.",
        }[change]
        return text, text
    size = "small" if cur.effusion == 2 else "moderate"
    base = f"{size} {side} {noun}"
    text = {
        None: pick(
            [
                f"{base.capitalize()}.",
                f"There is a {base}." if side != "bilateral" else f"{base.capitalize()} are present.",
            ]
        ),
        WORSE: pick([f"New {base}.", f"Interval development of {'a ' if side != 'bilateral' else ''}{base}."])
        if prev is not None and prev.effusion == 0
        else pick(
            [
                f"{base.capitalize()}, increased from the prior study.",
                f"Interval increase in the {side} {noun}, now {size}.",
            ]
        ),
        IMPROVED: pick(
            [
                f"{base.capitalize()}, decreased since the prior study.",
                f"Interval decrease in the {side} {noun}, now {size}.",
            ]
        ),
        STABLE: pick(
            [f"Unchanged {base}.", f"{base.capitalize()}, stable since the prior study.", f"Persistent {base}."]
        ),
    }[change]
    impression = {
        None: f"{base.capitalize()}.",
        WORSE: f"{base.capitalize()}, worse.",
        IMPROVED: f"{base.capitalize()}, improved.",
        STABLE: f"Stable {base}.",
    }[change]
    return text, impression


def _opacity(cur: ChestExam, prev: ChestExam | None, st: str, change: str | None, pick, mention_negative: bool):
    where = "bibasilar reticular opacities"
    if st == NEGATIVE:
        if change == IMPROVED:
            text = pick([f"Previously noted {where} are no longer evident.", f"Interval resolution of {where}."])
            return text, f"Resolved {where}."
        if not mention_negative:
            return None, None
        return pick(["No focal airspace opacity.", "No focal lung opacity."]), None
    if st == UNCERTAIN:
        text = {
            None: pick([f"Possible subtle {where}.", f"Questionable subtle {where}."]),
            WORSE: f"Possible new subtle {where}.",
            IMPROVED: f"Possible subtle {where}, decreased from the prior study.",
            STABLE: f"Possible subtle {where}, unchanged.",
        }[change]
        return text, text
    extent = "mild" if cur.fibrosis < 0.12 else ("moderate" if cur.fibrosis < 0.25 else "extensive")
    base = f"{extent} {where}"
    new = prev is not None and statuses(prev)[OPACITY] == NEGATIVE
    text = {
        None: pick([f"{base.capitalize()}, consistent with fibrosis.", f"{base.capitalize()}."]),
        WORSE: f"New {base}."
        if new
        else pick(
            [
                f"Interval increase in {where}, now {extent}.",
                f"{base.capitalize()}, increased since the prior study.",
                f"Progression of {where}, now {extent}.",
            ]
        ),
        IMPROVED: pick(
            [f"{base.capitalize()}, decreased from the prior study.", f"Slight decrease in {where}, now {extent}."]
        ),
        STABLE: pick([f"Stable {base}.", f"{base.capitalize()} are unchanged."]),
    }[change]
    impression = {
        None: f"{base.capitalize()}.",
        WORSE: f"{base.capitalize()}, worse.",
        IMPROVED: f"{base.capitalize()}, improved.",
        STABLE: f"Stable {base}.",
    }[change]
    return text, impression


def _lesion(cur: ChestExam, prev: ChestExam | None, st: str, change: str | None, pick, mention_negative: bool):
    zone = cur.lesion_zone
    if st == NEGATIVE:
        if change == IMPROVED:
            text = f"The previously seen {prev.lesion_zone} nodule is no longer visible."
            return text, text
        if not mention_negative:
            return None, None
        return pick(["No suspicious pulmonary nodule.", "No lung mass or nodule."]), None
    if st == UNCERTAIN:
        text = {
            None: pick(
                [f"Possible small nodule in the {zone}.", f"Questionable small nodule projecting over the {zone}."]
            ),
            WORSE: f"Possible new small nodule in the {zone}.",
            IMPROVED: f"Possible small nodule in the {zone}, decreased in size.",
            STABLE: f"Possible small nodule in the {zone}, unchanged.",
        }[change]
        return text, text
    mm = int(round(cur.lesion_mm))
    kind = "mass" if mm >= 30 else "nodule"
    new = prev is not None and statuses(prev)[LESION] == NEGATIVE
    text = {
        None: pick([f"{mm} mm {kind} in the {zone}.", f"There is a {mm} mm {kind} in the {zone}."]),
        WORSE: f"New {mm} mm {kind} in the {zone}."
        if new
        else pick(
            [f"The {zone} {kind} has increased in size, now {mm} mm.", f"Enlarging {mm} mm {kind} in the {zone}."]
        ),
        IMPROVED: f"The {zone} {kind} has decreased in size, now {mm} mm.",
        STABLE: pick([f"Stable {mm} mm {kind} in the {zone}.", f"The {mm} mm {kind} in the {zone} is unchanged."]),
    }[change]
    impression = {
        None: f"{mm} mm {kind} in the {zone}.",
        WORSE: f"{mm} mm {kind} in the {zone}, larger.",
        IMPROVED: f"{mm} mm {kind} in the {zone}, smaller.",
        STABLE: f"Stable {mm} mm {kind} in the {zone}.",
    }[change]
    if new:
        impression = f"New {mm} mm {kind} in the {zone}."
    return text, impression


def report(
    cur: ChestExam, prev: ChestExam | None, nodules: list[Nodule], k: int, rng: np.random.Generator
) -> tuple[str, dict[str, str], dict[str, str | None]]:
    """(text "FINDINGS: ...\\nIMPRESSION: ...", status per label, change per label)."""

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    st = statuses(cur)
    ch = changes(prev, cur, nodules, k) if prev is not None else {label: None for label in st}
    # Which negatives the reader bothers to write down: drawn every exam (aligned streams).
    mention = dict(zip((EFFUSION, OPACITY, LESION), rng.random(3) < (0.85, 0.5, 0.4)))
    findings, impressions = [], []
    if prev is not None:
        findings.append(
            pick(["Comparison is made with the prior radiograph.", "Comparison is made with the prior study."])
        )
    heart, heart_imp = _cardiac(cur, st[CARDIOMEGALY], ch[CARDIOMEGALY], pick)
    parts = [
        (OPACITY, _opacity(cur, prev, st[OPACITY], ch[OPACITY], pick, mention[OPACITY])),
        (LESION, _lesion(cur, prev, st[LESION], ch[LESION], pick, mention[LESION])),
        (EFFUSION, _effusion(cur, prev, st[EFFUSION], ch[EFFUSION], pick, mention[EFFUSION])),
    ]
    findings.append(heart)
    impressions.append(heart_imp)
    status = {NO_FINDING: NOT_MENTIONED, CARDIOMEGALY: st[CARDIOMEGALY]}
    for label, (text, imp) in parts:
        status[label] = st[label] if text is not None else NOT_MENTIONED
        if text is not None:
            findings.append(text)
        impressions.append(imp)
    impressions = [i for i in impressions if i]
    if not any(s in (POSITIVE, UNCERTAIN) for s in status.values()):
        status[NO_FINDING] = POSITIVE
        impressions.append(pick(["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process."]))
    change = {label: ch.get(label) for label in LABELS}
    text = "FINDINGS: " + " ".join(findings) + "\nIMPRESSION: " + " ".join(impressions)
    return text, {label: status[label] for label in LABELS}, change
