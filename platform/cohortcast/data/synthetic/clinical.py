"""The clinical half of the synthetic cohort: who the patients are, what their nodules
are, and how the nodules change between irregularly spaced exams. No pixels here.

Growth follows the volume-doubling-time (VDT) model used in screening guidelines:
V(t) = V0 * 2^(t / VDT), so the diameter grows as d(t) = d0 * 2^(t / (3 VDT)).
Malignant nodules double in ~100-400 days and tend to turn solid and spiculated;
benign ones are mostly stable (VDT > 2 years, or slowly resolving). Baseline size
and morphology overlap between classes, so the follow-up carries more information
about malignancy than the baseline, as in real screening.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from cohortcast.data.manifest import ATTENUATIONS, MARGINS

SOLID, GGO, PART_SOLID = "Soft Tissue", "Ground Glass", "Part Solid"
SMOOTH, POORLY, SPICULATED = "Smooth", "Poorly Defined", "Spiculated"
assert set(ATTENUATIONS) == {SOLID, GGO, PART_SOLID} and set(MARGINS) == {SMOOTH, POORLY, SPICULATED}

FIRST_NAMES = ("Alex", "Sam", "Jordan", "Robin", "Morgan", "Casey", "Jamie", "Taylor")
LAST_NAMES = ("Smith", "Garcia", "Chen", "Okafor", "Novak", "Rossi", "Dubois", "Larsen")


@dataclass
class NoduleState:
    """The nodule as seen at one exam."""

    long_mm: float
    perp_mm: float
    attenuation: str
    margins: str


@dataclass
class Nodule:
    nodule_id: str
    malignant: bool
    vdt_days: float  # volume doubling time; negative = shrinking, inf = stable
    rel_position: np.ndarray  # (3,) in [0, 1]^3 inside the lung's bounding box
    side: str  # "right" | "left"
    angle: float  # in-plane orientation of the long axis, radians
    spike_phase: float
    states: list[NoduleState] = field(default_factory=list)


@dataclass
class Patient:
    index: int
    mrn: str  # a site identifier: the manifest key that ingestion pseudonymises
    name: str
    birth_date: dt.date
    age: float
    gender: str
    diagemph: str
    family: dict[str, str]
    exam_dates: list[dt.date]
    nodules: list[Nodule]
    fibrosis_rate: float  # 0 = no fibrosis; else extent growth per year
    fibrosis_seed: int


def _yes(rng: np.random.Generator, p: float) -> str:
    return "Yes" if rng.random() < p else "No"


def _exam_dates(rng: np.random.Generator, n: int) -> list[dt.date]:
    first = dt.date(2002, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3 * 365)))
    dates = [first]
    for k in range(1, n):
        # First follow-up about a year later (NAMD's 1-year target); later ones irregular.
        gap = rng.integers(270, 451) if k == 1 else rng.integers(120, 541)
        dates.append(dates[-1] + dt.timedelta(days=int(gap)))
    return dates


def _vdt(rng: np.random.Generator, malignant: bool) -> float:
    if malignant:
        return float(np.clip(rng.lognormal(np.log(200.0), 0.35), 60.0, 600.0))
    kind = rng.random()
    if kind < 0.7:
        return float("inf")  # stable
    if kind < 0.9:
        return float(rng.uniform(900.0, 2500.0))  # very slow growth
    return -float(rng.uniform(300.0, 900.0))  # resolving (e.g. inflammatory)


def _baseline_state(rng: np.random.Generator, malignant: bool) -> NoduleState:
    long_mm = float(np.clip(rng.lognormal(np.log(9.0 if malignant else 8.0), 0.35), 4.0, 28.0))
    perp_mm = long_mm * float(rng.uniform(0.65, 1.0))
    att_p = (0.45, 0.3, 0.25) if malignant else (0.6, 0.3, 0.1)
    mar_p = (0.45, 0.35, 0.2) if malignant else (0.7, 0.25, 0.05)
    return NoduleState(
        long_mm,
        perp_mm,
        str(rng.choice([SOLID, GGO, PART_SOLID], p=att_p)),
        str(rng.choice([SMOOTH, POORLY, SPICULATED], p=mar_p)),
    )


def _evolve(rng: np.random.Generator, nod: Nodule, prev: NoduleState, days: float) -> NoduleState:
    years = days / 365.25
    factor = 2.0 ** (days / (3.0 * nod.vdt_days)) if np.isfinite(nod.vdt_days) else 1.0
    noise = rng.normal(0.0, 0.3, size=2)  # measurement noise, mm
    long_mm = float(np.clip(prev.long_mm * factor + noise[0], 2.0, 60.0))
    perp_mm = float(np.clip(prev.perp_mm * factor + noise[1], 1.5, long_mm))
    att, mar = prev.attenuation, prev.margins
    if nod.malignant:
        # Malignant ground glass gains a solid component; margins become irregular.
        if att == GGO and rng.random() < 1 - np.exp(-1.0 * years):
            att = PART_SOLID
        elif att == PART_SOLID and rng.random() < 1 - np.exp(-0.8 * years):
            att = SOLID
        if mar == SMOOTH and rng.random() < 1 - np.exp(-0.9 * years):
            mar = POORLY
        elif mar == POORLY and rng.random() < 1 - np.exp(-1.0 * years):
            mar = SPICULATED
    return NoduleState(long_mm, perp_mm, att, mar)


def _malignancy_logit_shift(age: float, emph: str, family: dict[str, str]) -> float:
    """EHR risk factors (age, emphysema, family history) raise the malignancy odds, so
    the EHR is consistent with the nodules it describes."""
    return 0.05 * (age - 62.0) + 0.6 * (emph == "Yes") + 0.35 * sum(v == "Yes" for v in family.values())


def make_patient(
    rng: np.random.Generator,
    index: int,
    min_exams: int,
    max_exams: int,
    max_nodules: int,
    malignant_fraction: float,
    fibrosis_fraction: float,
) -> Patient:
    age = float(np.round(rng.uniform(55.0, 75.0), 1))
    gender = str(rng.choice(["Male", "Female"]))
    emph = _yes(rng, 0.25)
    family = {
        k: _yes(rng, p)
        for k, p in (
            ("famfather", 0.12),
            ("fammother", 0.1),
            ("fambrother", 0.08),
            ("famsister", 0.06),
            ("famchild", 0.02),
        )
    }
    dates = _exam_dates(rng, int(rng.integers(min_exams, max_exams + 1)))
    base_logit = np.log(max(malignant_fraction, 1e-6) / max(1 - malignant_fraction, 1e-6))
    p_malig = 1.0 / (1.0 + np.exp(-(base_logit + _malignancy_logit_shift(age, emph, family))))
    nodules = []
    for n in range(int(rng.integers(1, max_nodules + 1))):
        malignant = bool(rng.random() < (p_malig if n == 0 else p_malig * 0.3))
        nod = Nodule(
            f"n{n + 1}",
            malignant,
            _vdt(rng, malignant),
            rel_position=rng.uniform([0.25, 0.3, 0.15], [0.75, 0.7, 0.85]),
            side=str(rng.choice(["right", "left"])),
            angle=float(rng.uniform(0, np.pi)),
            spike_phase=float(rng.uniform(0, 2 * np.pi)),
        )
        nod.states.append(_baseline_state(rng, malignant))
        for prev_date, date in zip(dates, dates[1:]):
            nod.states.append(_evolve(rng, nod, nod.states[-1], (date - prev_date).days))
        nodules.append(nod)
    birth = dates[0] - dt.timedelta(days=int(age * 365.25))
    return Patient(
        index=index,
        mrn=f"MRN{int(rng.integers(10**7, 10**8))}",
        name=f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
        birth_date=birth,
        age=age,
        gender=gender,
        diagemph=emph,
        family=family,
        exam_dates=dates,
        nodules=nodules,
        fibrosis_rate=float(rng.uniform(0.15, 0.5)) if rng.random() < fibrosis_fraction else 0.0,
        fibrosis_seed=int(rng.integers(0, 2**31)),
    )


def lobe_of(side: str, rel_z: float, rel_y: float) -> str:
    """Lobe from the position in the lung (rel_z: 0 = base, 1 = apex; rel_y: 0 = anterior)."""
    if side == "right":
        if rel_z > 0.62:
            return "Right Upper Lobe"
        return "Right Middle Lobe" if rel_z > 0.38 and rel_y < 0.5 else "Right Lower Lobe"
    if rel_z > 0.58:
        return "Left Upper Lobe"
    return "Lingula" if rel_z > 0.4 and rel_y < 0.5 else "Left Lower Lobe"
