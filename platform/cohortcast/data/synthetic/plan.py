"""Everything about a synthetic patient that is not pixels: the clinical record, the
fibrosis trajectory (trend model) and the chest findings of the CLDM radiographs. Tests
read trajectories and reports of a whole cohort from here in milliseconds; the cohort
writer renders exactly these.

Random streams: each patient has a SeedSequence (cohort seed, patient index). Its first
three children drive the NAMD cohort (clinical, anatomy, image) exactly as before issue 15;
the CLDM options draw from four further children (fibrosis, chest, x-ray, report; the
report one has a child per exam), so switching them on never changes what the first three
produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cohortcast.data.synthetic.clinical import Patient, make_patient
from cohortcast.data.synthetic.fibrosis import FibrosisPrior, FibrosisTrend, draw_trend
from cohortcast.data.synthetic.radiograph_reports import ChestExam, draw_ctr, draw_effusions, largest_nodule, report


@dataclass
class Streams:
    clinical: np.random.Generator
    anatomy: np.random.Generator
    image: np.random.Generator
    fibrosis: np.random.Generator
    chest: np.random.Generator
    xray: np.random.Generator
    report: np.random.SeedSequence  # one child per exam: a report's wording is its own


def streams(seed: int, index: int) -> Streams:
    seq = np.random.SeedSequence([seed, index])
    namd = [np.random.default_rng(s) for s in seq.spawn(3)]
    fibrosis, chest, xray, report_seq = seq.spawn(4)
    return Streams(*namd, *(np.random.default_rng(s) for s in (fibrosis, chest, xray)), report_seq)


@dataclass(frozen=True)
class RadiographReport:
    exam: ChestExam  # what the radiograph shows
    text: str  # "FINDINGS: ...\nIMPRESSION: ..."
    status: dict[str, str]  # CheXpert label -> positive / negative / uncertain / not_mentioned
    change: dict[str, str | None]  # label -> improved / stable / worse, None when not compared


@dataclass
class PatientPlan:
    patient: Patient
    years: np.ndarray  # per exam, since the first
    trend: FibrosisTrend | None  # trend model with fibrosis only
    fractions: np.ndarray | None  # fibrotic fraction of the lung per exam (trend model)
    ctr: float | None  # cardiothoracic ratio (radiographs only)
    effusions: list[tuple[int, str]] | None  # (severity, side) per exam (radiographs only)
    report_seq: np.random.SeedSequence

    def chest_exam(self, k: int, fibrosis: float) -> ChestExam:
        severity, side = self.effusions[k]
        return ChestExam(self.ctr, severity, side, fibrosis, *largest_nodule(self.patient.nodules, k))

    def radiograph_report(self, k: int, fibrosis: float, prior: ChestExam | None) -> RadiographReport:
        """Exam k's radiograph report given its fibrotic fraction and the prior exam's truth."""
        seq = np.random.SeedSequence(self.report_seq.entropy, spawn_key=(*self.report_seq.spawn_key, k))
        exam = self.chest_exam(k, fibrosis)
        return RadiographReport(exam, *report(exam, prior, self.patient.nodules, k, np.random.default_rng(seq)))

    def radiograph_reports(self) -> list[RadiographReport]:
        """Every exam's report (trend model: the fractions are known without pixels)."""
        out: list[RadiographReport] = []
        for k in range(len(self.years)):
            fibrosis = float(self.fractions[k]) if self.fractions is not None else 0.0
            out.append(self.radiograph_report(k, fibrosis, out[-1].exam if out else None))
        return out


def plan_patient(cfg, index: int, rngs: Streams | None = None) -> PatientPlan:
    """The patient `index` of the cohort `cfg` (a SynthConfig); `rngs` are its streams
    (made here when not given; the cohort writer passes its own to go on drawing)."""
    rngs = rngs or streams(cfg.seed, index)
    patient = make_patient(
        rngs.clinical,
        index,
        cfg.min_exams,
        cfg.max_exams,
        cfg.max_nodules,
        cfg.malignant_fraction,
        cfg.fibrosis_fraction,
    )
    years = np.array([(d - patient.exam_dates[0]).days / 365.25 for d in patient.exam_dates])
    trend = fractions = None
    # Who has fibrosis is the clinical stream's draw in both models (fibrosis_rate > 0);
    # the trend model replaces only how it evolves.
    if cfg.fibrosis_model == "trend" and patient.fibrosis_rate > 0:
        prior = FibrosisPrior.from_config(cfg)
        trend = draw_trend(prior, rngs.fibrosis)
        fractions = trend.observe(prior, years, rngs.fibrosis)
    ctr = effusions = None
    if cfg.radiographs:
        ctr = draw_ctr(rngs.chest, cfg.cardiomegaly_fraction)
        effusions = draw_effusions(rngs.chest, len(years), cfg.effusion_onset, cfg.effusion_resolve)
    return PatientPlan(patient, years, trend, fractions, ctr, effusions, rngs.report)
