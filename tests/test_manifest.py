import shutil

import pandas as pd
import pytest

from cohortcast.data.manifest import ManifestError, load_manifest


@pytest.fixture
def editable(tiny_cohort, tmp_path):
    """A copy of the tiny cohort's tables (not images) to break in different ways."""
    dst = tmp_path / "m"
    dst.mkdir()
    for name in ("patients", "studies", "findings", "labels"):
        shutil.copy(tiny_cohort / f"{name}.parquet", dst / f"{name}.parquet")
    return dst


def _edit(folder, table, fn):
    """Edit one table and save it as CSV (Parquet could not hold a mistyped value)."""
    frame = fn(pd.read_parquet(folder / f"{table}.parquet"))
    (folder / f"{table}.parquet").unlink()
    frame.to_csv(folder / f"{table}.csv", index=False)


def test_synthetic_manifest_is_valid(tiny_cohort):
    m = load_manifest(tiny_cohort)
    assert len(m.patients) == 4 and len(m.studies) >= 8
    assert m.fingerprint() == load_manifest(tiny_cohort).fingerprint()


def test_csv_is_accepted(editable):
    for name in ("patients", "studies", "findings", "labels"):
        pd.read_parquet(editable / f"{name}.parquet").to_csv(editable / f"{name}.csv", index=False)
        (editable / f"{name}.parquet").unlink()
    m = load_manifest(editable)
    assert m.findings["SCT_LONG_DIA"].dtype.kind == "f"


def _set(column, row, value):
    def fn(frame):
        frame = frame.astype({column: object})
        frame.loc[row, column] = value
        return frame

    return fn


@pytest.mark.parametrize(
    "table, fn, fragment",
    [
        ("studies", _set("study_date", 1, "31/31/2003"), "studies row 1 (study_id="),
        ("studies", _set("study_date", 1, "31/31/2003"), "study_date: '31/31/2003' is not a valid date"),
        ("studies", _set("modality", 0, "PET"), "modality: 'PET' is not one of"),
        ("findings", _set("SCT_PRE_ATT", 2, "Calcified"), "findings row 2 (study_id="),
        ("findings", _set("SCT_LONG_DIA", 0, -3.0), "SCT_LONG_DIA: -3.0 must be in (0, 300] mm"),
        ("findings", _set("SCT_PERP_DIA", 0, 299.0), "SCT_PERP_DIA: 299.0 exceeds SCT_LONG_DIA"),
        ("patients", _set("age", 0, "old"), "age: 'old' is not a valid float"),
        ("labels", _set("malignant", 0, 2), "malignant: '2' is not a valid int01 (must be 0 or 1)"),
        ("studies", _set("patient_id", 0, "MRN-UNKNOWN"), "patient_id: 'MRN-UNKNOWN' is not in patients"),
        ("studies", lambda f: pd.concat([f, f.iloc[[0]]]), "duplicate key"),
        ("findings", lambda f: f.drop(columns=["center_y_mm"]), "findings: missing required column(s) ['center_y_mm']"),
        ("labels", _set("nodule_id", 0, "n99"), "nodule_id: 'n99' has no finding for this patient"),
    ],
)
def test_validation_names_row_and_field(editable, table, fn, fragment):
    _edit(editable, table, fn)
    with pytest.raises(ManifestError) as err:
        load_manifest(editable)
    assert fragment in str(err.value)


def test_all_problems_reported_at_once(editable):
    _edit(editable, "studies", _set("modality", 0, "PET"))
    _edit(editable, "findings", _set("SCT_MARGINS", 1, "Fuzzy"))
    with pytest.raises(ManifestError) as err:
        load_manifest(editable)
    assert len(err.value.problems) == 2


def test_missing_table_and_unreadable_file(editable):
    (editable / "labels.parquet").unlink()
    with pytest.raises(ManifestError, match="no labels.parquet or labels.csv"):
        load_manifest(editable)
    (editable / "labels.parquet").write_bytes(b"garbage")
    with pytest.raises(ManifestError, match="labels.parquet: cannot be read"):
        load_manifest(editable)
