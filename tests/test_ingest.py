"""Ray Data ingestion on the shared local Ray instance, with a cohort that has a
truncated DICOM file, a missing NIfTI file and a finding outside its image."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest

from cohortcast.config import IngestConfig, PrivacyConfig
from cohortcast.data import ingest as ingest_module
from cohortcast.data.ingest import run_ingest
from cohortcast.data.manifest import load_manifest
from cohortcast.data.privacy import Pseudonymizer

pytestmark = pytest.mark.ray


def tiny_ingest_config(manifest: Path, output: Path, **kw) -> IngestConfig:
    base = dict(
        manifest=str(manifest),
        output=str(output),
        crop_size=16,
        crop_spacing_mm=2.0,
        patch_size=8,
        patch_spacing_mm=3.0,
        volume_shape=(8, 16, 16),
        rows_per_file=4,
    )
    base.update(kw)
    return IngestConfig(**base)


@pytest.fixture(scope="module")
def broken_cohort(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken") / "manifest"
    shutil.copytree(tiny_cohort, root)
    m = load_manifest(root)
    dicom = [p for p in m.studies.path if p.endswith("_dicom")]
    nifti = [p for p in m.studies.path if p.endswith(".nii.gz")]
    victim = sorted((root / dicom[0]).iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:-500])  # truncated pixel data
    (root / nifti[0]).unlink()  # path in the manifest, file gone
    findings = pd.read_parquet(root / "findings.parquet")
    ok_study = next(
        s
        for s in m.studies.study_id
        if m.studies.set_index("study_id").loc[s, "path"] not in (dicom[0], nifti[0]) and (findings.study_id == s).any()
    )
    row = findings.index[findings.study_id == ok_study][0]
    findings.loc[row, "center_x_mm"] += 1000.0  # outside the image
    findings.to_parquet(root / "findings.parquet", index=False)
    return {
        "root": root,
        "corrupt": dicom[0],
        "missing": nifti[0],
        "outside": (ok_study, findings.loc[row, "nodule_id"]),
    }


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def ingested(ray_session, broken_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest") / "out"
    capture = _Capture()
    logging.getLogger("cohortcast").addHandler(capture)
    logging.getLogger("cohortcast").setLevel(logging.DEBUG)
    try:
        card = run_ingest(tiny_ingest_config(broken_cohort["root"], out))
    finally:
        logging.getLogger("cohortcast").removeHandler(capture)
    return {"card": card, "out": out, "logs": "\n".join(capture.lines), **broken_cohort}


def _read(out: Path, table: str) -> pd.DataFrame:
    return pq.read_table(out / table).to_pandas()  # hive partitions restore `split`


def test_quarantine_counts_and_reasons(ingested):
    card = ingested["card"]
    m = load_manifest(ingested["root"])
    c = card["counts"]
    assert c["studies"] == len(m.studies)
    assert c["studies_quarantined"] == 2 and c["studies_ingested"] == len(m.studies) - 2
    assert c["findings_quarantined"] == 1
    quarantine = pq.read_table(ingested["out"] / "quarantine.parquet").to_pandas()
    by_path = dict(zip(quarantine.path, quarantine.reason))
    assert by_path[ingested["corrupt"]] == "corrupt_file"
    assert by_path[ingested["missing"]] == "missing_path"
    assert card["quarantine_reasons"] == {"corrupt_file": 1, "missing_path": 1, "finding_outside_image": 1}
    outside = quarantine[quarantine.reason == "finding_outside_image"]
    assert outside.nodule_id.tolist() == [ingested["outside"][1]]
    assert "outside image" in outside.message.iloc[0]
    # Every finding in one bucket: cropped, with its quarantined study, or itself quarantined.
    bad = m.studies.set_index("path").loc[[ingested["corrupt"], ingested["missing"]], "study_id"]
    assert c["findings_with_quarantined_study"] == int(m.findings.study_id.isin(bad).sum()) > 0
    assert c["findings"] == c["findings_cropped"] + c["findings_with_quarantined_study"] + c["findings_quarantined"]
    # Messages name the manifest-relative path, never where the manifest folder lives.
    root = str(ingested["root"].resolve())
    assert all(root not in msg and str(ingested["root"]) not in msg for msg in quarantine.message)
    assert any(msg.startswith(ingested["corrupt"] + "/") for msg in quarantine.message)


def test_nodule_rows_shapes_labels_and_ehr(ingested):
    nodules = _read(ingested["out"], "nodules")
    m = load_manifest(ingested["root"])
    bad = m.studies.set_index("path").loc[[ingested["corrupt"], ingested["missing"]], "study_id"]
    expected = len(m.findings[~m.findings.study_id.isin(bad)]) - 1
    assert len(nodules) == expected == sum(ingested["card"]["counts"]["nodule_rows"].values())
    crops = np.stack(nodules.crop.to_numpy())
    assert crops.shape == (expected, 16, 16) and crops.min() >= -1.0 and crops.max() <= 1.0
    assert np.stack(nodules.patch.to_numpy()).shape == (expected, 8, 8, 8)
    # Crops are nodule-centred: the centre is denser (brighter) than the crop's mean.
    centre = crops[:, 7:9, 7:9].mean(axis=(1, 2))
    assert (centre > crops.mean(axis=(1, 2))).mean() > 0.9
    pseudo = Pseudonymizer.from_config(PrivacyConfig())
    labels = {(pseudo(p), n): y for p, n, y in m.labels.itertuples(index=False)}
    assert all(labels[(r.patient, r.nodule_id)] == r.malignant for r in nodules.itertuples())
    assert nodules.SCT_LONG_DIA.notna().all() and set(nodules.gender) <= {"Male", "Female"}


def test_splits_are_patient_level_and_disjoint(ingested):
    for table in ("nodules", "studies"):
        frame = _read(ingested["out"], table)
        assert frame.groupby("patient").split.nunique().max() == 1
        assert set(frame.split) <= {"train", "val", "test"}
        folders = {p.name for p in (ingested["out"] / table).iterdir() if p.is_dir()}
        assert folders == {f"split={s}" for s in set(frame.split)}
        counts = frame.split.value_counts().to_dict()
        card_counts = ingested["card"]["counts"]["nodule_rows" if table == "nodules" else "study_rows"]
        assert {k: v for k, v in card_counts.items() if v} == counts


def test_study_volumes_masks_and_geometry(ingested):
    studies = _read(ingested["out"], "studies")
    assert np.stack(studies.volume.to_numpy()).shape[1:] == (8, 16, 16)
    masked = studies[studies.has_mask]
    assert len(masked) > 0 and all(np.stack(masked["mask"].to_numpy()).reshape(len(masked), -1).max(axis=1) == 1)
    affine = np.asarray(studies.source_affine.iloc[0]).reshape(4, 4)
    assert affine[3, 3] == 1.0 and np.linalg.det(affine[:3, :3]) > 0
    # Whole-study columns: lesion volumes on the source grid, zeros where a study has no
    # such mask or image; exams numbered per patient and dims.
    assert str(studies.dims.dtype) == "int8" and set(studies.dims) <= {2, 3}
    assert (masked.mask_volume_ml > 0).any() and (studies.mask_volume_ml[~studies.has_mask] == 0).all()
    assert (studies.lung_voxels[~studies.has_lung_mask] == 0).all()
    assert np.stack(studies.radiograph.to_numpy()).shape[1:] == (64, 64)  # radiograph_size default
    assert all(not np.asarray(r).any() for r in studies.radiograph[studies.dims == 3])
    for _, exams in studies.groupby(["patient", "dims"]):
        assert exams.exam_index.is_unique and (exams.exam_index < exams.num_exams).all()
    card = ingested["card"]["tables"]["studies"]
    assert card["lung_mask"] == [8, 16, 16] and card["radiograph"] == [64, 64] and card["antialias"] is True


def test_no_identifiers_anywhere(ingested):
    m = load_manifest(ingested["root"])
    identifiers = set(m.patients.patient_id) | set(m.studies.study_id)
    for study_path in m.studies.path:
        folder = ingested["root"] / study_path
        if folder.is_dir():
            ds = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
            identifiers |= {
                str(ds.PatientName),
                str(ds.PatientName).split("^")[0],
                ds.PatientID,
                ds.PatientBirthDate,
                ds.AccessionNumber,
                ds.InstitutionName,
            }
    texts = [ingested["logs"], (ingested["out"] / "card.json").read_text()]
    for path in ingested["out"].rglob("*.parquet"):
        table = pq.read_table(path)
        plain = table.drop_columns(
            [
                c
                for c in table.column_names
                if c
                in {
                    "crop",
                    "crop_affine",
                    "patch",
                    "volume",
                    "mask",
                    "lung_mask",
                    "radiograph",
                    "radiograph_affine",
                    "source_shape",
                    "source_affine",
                    "volume_affine",
                }
            ]
        )
        texts.append(json.dumps(plain.to_pylist(), default=str))
        texts.append(path.read_bytes().decode("latin-1"))
    blob = "\n".join(texts)
    leaked = sorted(i for i in identifiers if i and i in blob)
    assert not leaked, f"identifiers in outputs: {leaked}"
    assert "sub-" in blob  # pseudonyms are there instead


def test_rerun_reuses_and_changed_config_rebuilds(ingested):
    before = {p: p.stat().st_mtime_ns for p in ingested["out"].rglob("*")}
    again = run_ingest(tiny_ingest_config(ingested["root"], ingested["out"]))
    assert again["reused"] and again["fingerprint"] == ingested["card"]["fingerprint"]
    assert before == {p: p.stat().st_mtime_ns for p in ingested["out"].rglob("*")}


def test_interrupted_run_leaves_nothing_that_looks_finished_and_rerun_completes(
    ray_session, broken_cohort, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    calls = {"n": 0}
    real_write = ingest_module.pq.write_table

    def crash(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt("simulated interruption while writing")

    monkeypatch.setattr(ingest_module.pq, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(tiny_ingest_config(broken_cohort["root"], out))
    assert calls["n"] == 1 and not out.exists()
    # A killed process leaves its temp folder behind: the rerun must clear it.
    stale = tmp_path / ".out.tmp-killed"
    (stale / "nodules").mkdir(parents=True)
    monkeypatch.setattr(ingest_module.pq, "write_table", real_write)
    card = run_ingest(tiny_ingest_config(broken_cohort["root"], out, crop_size=12))
    assert not card["reused"] and (out / "card.json").is_file() and not stale.exists()
    assert card["tables"]["nodules"]["crop"] == [12, 12]
    assert np.stack(_read(out, "nodules").crop.to_numpy()).shape[1:] == (12, 12)
