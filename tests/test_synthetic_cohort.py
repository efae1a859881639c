"""The synthetic cohort: real files, deterministic, and with the statistics the
forecasting task needs (malignant nodules grow faster; the follow-up tells more
about malignancy than the baseline)."""

import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from conftest import tiny_synth_config

from cohortcast.data.manifest import load_manifest
from cohortcast.data.readers import read_study
from cohortcast.data.synthetic import generate_cohort
from cohortcast.data.synthetic.clinical import make_patient


def _tables(folder):
    return {n: pd.read_parquet(folder / f"{n}.parquet") for n in ("patients", "studies", "findings", "labels")}


def test_same_seed_same_cohort_any_worker_count(tiny_cohort, tmp_path):
    again = tmp_path / "again"
    generate_cohort(tiny_synth_config(), again, workers=2, progress=False)
    first, second = _tables(tiny_cohort), _tables(again)
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])
    for rel in first["studies"]["path"]:
        np.testing.assert_array_equal(read_study(tiny_cohort / rel).array, read_study(again / rel).array)
    other = tmp_path / "other"
    generate_cohort(tiny_synth_config(seed=8), other, progress=False)
    assert not _tables(other)["findings"].equals(first["findings"])


def test_files_are_real_dicom_and_nifti_with_findings_visible(tmp_path):
    # Finer grid and little noise than the tiny cohort, so even a 6 mm ground-glass
    # nodule covers its centre voxel without partial-volume blur.
    cfg = tiny_synth_config(
        patients=3,
        image_size=128,
        num_slices=24,
        pixel_spacing_mm=2.5,
        slice_thickness_mm=3.0,
        noise_hu=5.0,
        nifti_fraction=0.5,
    )
    generate_cohort(cfg, tmp_path / "fine", progress=False)
    m = load_manifest(tmp_path / "fine")
    kinds, checked = set(), 0
    for study in m.studies.itertuples():
        path = m.resolve(study.path)
        kinds.add("nifti" if str(path).endswith(".nii.gz") else "dicom")
        vol = read_study(path)
        for f in m.findings[m.findings.study_id == study.study_id].itertuples():
            i, j, k = np.round(vol.world_to_voxel([[f.center_x_mm, f.center_y_mm, f.center_z_mm]])[0]).astype(int)
            # Lung parenchyma is about -850 HU; every nodule, even ground glass, is denser.
            assert vol.array[k, j, i] > -700, (study.path, f.nodule_id, vol.array[k, j, i])
            checked += 1
    assert kinds == {"nifti", "dicom"} and checked >= 6
    first_dicom = next(p for p in m.studies.path if p.endswith("_dicom"))
    ds = pydicom.dcmread(sorted(m.resolve(first_dicom).iterdir())[0])
    assert ds.Modality == "CT" and ds.RescaleIntercept == -1024 and ds.PatientID in set(m.patients.patient_id)


def test_fibrosis_masks_grow_and_reports_describe_change(tiny_cohort):
    m = load_manifest(tiny_cohort)
    with_mask = m.studies.dropna(subset=["mask_path"]).sort_values("study_date")
    assert len(with_mask) > 0
    for _, studies in with_mask.groupby("patient_id"):
        sizes = [read_study(m.resolve(p)).array.sum() for p in studies.mask_path]
        assert all(b >= a for a, b in zip(sizes, sizes[1:])) and sizes[-1] > sizes[0]
    follow_ups = m.studies[m.studies.report_text.str.contains("COMPARISON: 2")]
    assert follow_ups.report_text.str.contains("previously|stable in size", regex=True).all()
    assert "Nodule n1" in m.studies.report_text.iloc[0]


def _clinical_cohort(n=600, seed=11):
    rng = np.random.default_rng(seed)
    return [make_patient(rng, i, 2, 3, 1, 0.3, 0.0) for i in range(n)]


def test_malignant_nodules_grow_faster():
    patients = _clinical_cohort()
    rates = {True: [], False: []}
    for p in patients:
        nod = p.nodules[0]
        years = (p.exam_dates[1] - p.exam_dates[0]).days / 365.25
        rates[nod.malignant].append((nod.states[1].long_mm - nod.states[0].long_mm) / years)
    assert len(rates[True]) > 50 and len(rates[False]) > 200
    assert np.mean(rates[True]) > np.mean(rates[False]) + 2.0  # mm per year


def test_follow_up_separates_classes_better_than_baseline():
    patients = _clinical_cohort()
    y = [p.nodules[0].malignant for p in patients]
    base = [p.nodules[0].states[0].long_mm for p in patients]
    follow = [p.nodules[0].states[1].long_mm for p in patients]
    auc_base, auc_follow = roc_auc_score(y, base), roc_auc_score(y, follow)
    assert 0.5 < auc_base < 0.75  # baseline size is only weakly informative
    assert auc_follow > auc_base + 0.1

    def spiculated(k):
        return np.mean([p.nodules[0].states[k].margins == "Spiculated" for p in patients if p.nodules[0].malignant])

    assert spiculated(1) > spiculated(0)


def test_ehr_risk_factors_are_consistent_with_malignancy():
    patients = _clinical_cohort(n=1500)
    malignant = np.array([p.nodules[0].malignant for p in patients])
    emph = np.array([p.diagemph == "Yes" for p in patients])
    assert malignant[emph].mean() > malignant[~emph].mean()


def test_existing_output_is_not_overwritten(tiny_cohort):
    with pytest.raises(FileExistsError):
        generate_cohort(tiny_synth_config(), tiny_cohort, progress=False)
    assert json.loads((tiny_cohort / "synth.json").read_text())["counts"]["patients"] == 4
