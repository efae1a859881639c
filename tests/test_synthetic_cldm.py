"""The CLDM cohort (issue 15): a fibrosis trend model in which more priors really help, lung
masks, and chest radiographs written as DX DICOM whose geometry puts anatomy where it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import tiny_synth_config

from cohortcast.config import ConfigError, SynthConfig, load_config
from cohortcast.data.manifest import load_manifest
from cohortcast.data.readers import read_study
from cohortcast.data.synthetic import generate_cohort
from cohortcast.data.synthetic.chest import effusion_region, expose, line_integral, radiograph_geometry, with_heart
from cohortcast.data.synthetic.fibrosis import FibrosisPrior, TrendOracle
from cohortcast.data.synthetic.phantom import Grid, make_anatomy
from cohortcast.data.synthetic.plan import plan_patient
from cohortcast.io.dicom import DicomIdentity, write_dx_image

ROOT = Path(__file__).resolve().parents[1]
CLDM_DEBUG = ROOT / "jobs" / "configs" / "cldm_debug.yaml"


def oracle_errors(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """|f_pred - f_true| (fraction of lung = aVD) at every target exam with >= 4 priors of
    every patient with fibrosis, for the Bayes oracle from all / the last 3 / the last
    prior, and for copying the last prior. No images: the trajectories the cohort renders."""
    oracle = TrendOracle(FibrosisPrior.from_config(cfg))
    errors: dict[str, list[float]] = {"all": [], "last3": [], "last1": [], "copy_last": []}
    for index in range(cfg.patients):
        plan = plan_patient(cfg, index)
        if plan.fractions is None:
            continue
        t, f = plan.years, plan.fractions
        for k in range(4, len(t)):
            for name, first in (("all", 0), ("last3", k - 3), ("last1", k - 1)):
                errors[name].append(abs(oracle.forecast(t[first:k], f[first:k], t[k]) - f[k]))
            errors["copy_last"].append(abs(f[k - 1] - f[k]))
    return {name: np.array(v) for name, v in errors.items()}


def test_more_priors_forecast_fibrosis_better_without_learning():
    """On the shipped CLDM debug cohort (>= 120 patients): oracle from all priors < last 3 <
    last 1 < copy-last in mean aVD, each by a clear margin (README: CLDM cohort)."""
    cfg = load_config(CLDM_DEBUG).synth
    assert cfg.patients >= 120 and cfg.fibrosis_model == "trend"
    errors = oracle_errors(cfg)
    mean = {name: float(e.mean()) for name, e in errors.items()}
    assert len(errors["all"]) >= 100, len(errors["all"])
    assert mean["all"] < 0.85 * mean["last3"], mean
    assert mean["last3"] < 0.85 * mean["last1"], mean
    assert mean["last1"] < 0.85 * mean["copy_last"], mean


def test_trend_model_has_stable_patients_and_realistic_progressors():
    cfg = load_config(CLDM_DEBUG).synth
    trends = [p.trend for p in (plan_patient(cfg, i) for i in range(cfg.patients)) if p.trend is not None]
    rates = np.array([t.rate for t in trends])
    assert 0.25 < np.mean(rates == 0) < 0.6  # a sizeable stable group
    assert 0.01 <= rates[rates > 0].min() and rates.max() <= 0.06  # a few % of lung per year


def cldm_config(**overrides) -> SynthConfig:
    base = dict(
        patients=3,
        seed=5,
        min_exams=4,
        max_exams=5,
        image_size=48,
        num_slices=16,
        fibrosis_fraction=1.0,
        fibrosis_model="trend",
        lung_masks=True,
        radiographs=True,
        radiograph_pixel_mm=4.0,
        effusion_onset=0.6,
    )
    base.update(overrides)
    return tiny_synth_config(**base)


@pytest.fixture(scope="module")
def cldm_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cldm") / "cohort"
    cfg = cldm_config()
    generate_cohort(cfg, out, progress=False)
    return cfg, out


def test_every_exam_has_a_ct_with_masks_and_a_radiograph_with_its_report(cldm_cohort):
    cfg, out = cldm_cohort
    m = load_manifest(out)
    ct, dx = m.studies[m.studies.modality == "CT"], m.studies[m.studies.modality == "DX"]
    assert len(ct) == len(dx) >= 12
    assert ct.lung_mask_path.notna().all() and dx.lung_mask_path.isna().all() and dx.mask_path.isna().all()
    # One CT + one DX per exam, same patient and date.
    pairs = ct.merge(dx, on=["patient_id", "study_date"], suffixes=("_ct", "_dx"))
    assert len(pairs) == len(ct) and (pairs.study_id_dx == pairs.study_id_ct + "-DX").all()
    for index in range(cfg.patients):
        plan = plan_patient(cfg, index)
        rows = ct[ct.patient_id == plan.patient.mrn].sort_values("study_date")
        texts = dx[dx.patient_id == plan.patient.mrn].sort_values("study_date").report_text.tolist()
        # The manifest's reports are the plan's: what the labeler test reads is what is written.
        assert texts == [r.text for r in plan.radiograph_reports()]
        for k, row in enumerate(rows.itertuples()):
            lung = read_study(m.resolve(row.lung_mask_path)).array > 0
            fib = read_study(m.resolve(row.mask_path)).array > 0
            assert not (fib & ~lung).any()  # fibrosis lies in the (aerated) lung
            # The written mask holds the trajectory's fraction of the lung, to one voxel.
            assert abs(fib.sum() / lung.sum() - plan.fractions[k]) <= 0.5 / lung.sum() + 1e-12
    assert all(t.startswith("FINDINGS: ") and "\nIMPRESSION: " in t for t in dx.report_text)


def test_effusion_is_fluid_in_the_ct_and_leaves_the_lung_mask(cldm_cohort):
    cfg, out = cldm_cohort
    m = load_manifest(out)
    ct = m.studies[m.studies.modality == "CT"]
    seen = 0
    for index in range(cfg.patients):
        plan = plan_patient(cfg, index)
        rows = ct[ct.patient_id == plan.patient.mrn].sort_values("study_date")
        sizes = [int((read_study(m.resolve(p)).array > 0).sum()) for p in rows.lung_mask_path]
        for k, (severity, _) in enumerate(plan.effusions):
            if severity == 0:
                continue
            dry = [s for s, (sev, _) in zip(sizes, plan.effusions) if sev == 0]
            if dry:
                assert sizes[k] < max(dry)  # fluid displaces aerated lung
                seen += 1
    assert seen >= 1


def test_radiograph_is_dx_with_detector_geometry_and_anatomy_where_it_belongs(tmp_path):
    """Written and read back with pydicom: DX tags as interface15 section 1 says; the heart
    (left of the midline) brightens columns right of the image centre; a left effusion
    brightens the bottom rows on the same side."""
    grid = Grid((24, 64, 64), 5.0, 8.0)
    anatomy = make_anatomy(np.random.default_rng(0), grid)
    pitch = 4.0
    ident = DicomIdentity(
        "Doe^Jane", "MRN123", None, "F", "ACC1", "Synthetic General Hospital", pd.Timestamp("2003-04-05").date(), "t"
    )

    def film(hu, name):
        pixels = expose(line_integral(hu, grid, pitch), np.random.default_rng(1))
        write_dx_image(pixels, tmp_path / f"{name}.dcm", ident, (pitch, pitch))
        ds = pydicom.dcmread(tmp_path / f"{name}.dcm")
        return ds, ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    ds, plain = film(anatomy.hu, "plain")
    assert ds.Modality == "DX" and ds.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
    assert [float(v) for v in ds.ImagerPixelSpacing] == [pitch, pitch] and list(ds.PatientOrientation) == ["L", "F"]
    assert "ImageOrientationPatient" not in ds and "ImagePositionPatient" not in ds and "PixelSpacing" not in ds
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.PatientID == "MRN123"
    assert (ds.Rows, ds.Columns) == radiograph_geometry(grid, pitch) == (48, 80)
    rows, cols = plain.shape
    # Aerated lung is darker than the mediastinum between the lungs (MONOCHROME2: bright = dense).
    mid_rows = slice(rows // 3, 2 * rows // 3)
    assert plain[mid_rows, cols // 2 - 2 : cols // 2 + 2].mean() > plain[mid_rows, cols // 4].mean() + 200

    hearted = with_heart(anatomy, grid, ctr=0.6)
    _, heart = film(hearted.hu, "heart")
    diff = np.clip(heart - plain, 0, None)
    assert diff.sum() > 0
    centre_col = (diff.sum(0) * np.arange(cols)).sum() / diff.sum()
    centre_row = (diff.sum(1) * np.arange(rows)).sum() / diff.sum()
    assert centre_col > cols / 2 + 2  # the heart lies to the patient's left: columns past the centre
    assert centre_row > rows / 2  # and in the lower chest

    wet = hearted.hu.copy()
    wet[effusion_region(hearted, grid, 3, "left")] = 15.0
    _, effusion = film(wet, "effusion")
    diff = np.clip(effusion - heart, 0, None)
    assert (diff.sum(1) * np.arange(rows)).sum() / diff.sum() > 0.7 * rows  # the lung base: bottom rows
    assert (diff.sum(0) * np.arange(cols)).sum() / diff.sum() > cols / 2  # the left side


def test_cldm_options_are_validated_with_clear_errors():
    with pytest.raises(ConfigError, match="fibrosis_rate_range"):
        load_config(None, ["synth.fibrosis_rate_range=[0.05,0.01]"])
    with pytest.raises(ConfigError, match="fibrosis_model"):
        load_config(None, ["synth.fibrosis_model=exponential"])
    with pytest.raises(ConfigError, match="radiograph_pixel_mm"):
        load_config(None, ["synth.radiograph_pixel_mm=0"])
    with pytest.raises(ConfigError, match="effusion_onset"):
        load_config(None, ["synth.effusion_onset=1.5"])
