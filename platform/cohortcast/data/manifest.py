"""The cohort manifest: four tables in one folder (Parquet; CSV accepted on input).

    patients.parquet  patient_id, age, gender, diagemph, famfather, fammother,
                      fambrother, famsister, famchild          (patient-level EHR)
    studies.parquet   study_id, patient_id, study_date, modality, path,
                      [mask_path], [report_text]
    findings.parquet  study_id, nodule_id, center_{x,y,z}_mm (LPS), SCT_LONG_DIA,
                      SCT_PERP_DIA, SCT_PRE_ATT, SCT_MARGINS, SCT_EPI_LOC
    labels.parquet    patient_id, nodule_id, malignant

The 13 NAMD EHR features (NAMD App. C) are the 8 patient columns plus the 5 SCT_*
columns of a finding, named as in NLST. A nodule keeps its `nodule_id` across studies.
Paths are relative to the manifest folder (or absolute). `patient_id` may be any
site identifier: ingestion replaces it by a keyed-hash pseudonym before anything is
written. Validation collects every problem and names table, row and field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cohortcast.errors import CohortcastError
from cohortcast.io.atomic import atomic_folder

YES_NO = ("Yes", "No")
ATTENUATIONS = ("Soft Tissue", "Ground Glass", "Part Solid")
MARGINS = ("Smooth", "Poorly Defined", "Spiculated")
LOBES = ("Right Upper Lobe", "Right Middle Lobe", "Right Lower Lobe", "Left Upper Lobe", "Left Lower Lobe", "Lingula")
MODALITIES = ("CT", "CR", "DX", "MR")
PATIENT_EHR = ("age", "diagemph", "gender", "famfather", "fammother", "fambrother", "famsister", "famchild")
NODULE_EHR = ("SCT_PRE_ATT", "SCT_EPI_LOC", "SCT_LONG_DIA", "SCT_PERP_DIA", "SCT_MARGINS")
EHR_FEATURES = NODULE_EHR + PATIENT_EHR  # the 13 NAMD features, in App. C order
TABLES = ("patients", "studies", "findings", "labels")


class ManifestError(CohortcastError, ValueError):
    """The manifest is invalid; `problems` lists every fault found (table, row, field)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"invalid manifest ({len(problems)} problem(s)):\n  {shown}{more}")


@dataclass(frozen=True)
class Column:
    kind: str  # "str" | "float" | "int01" | "date"
    required: bool = True  # may the value be missing?
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    check_text: str = ""


SCHEMA: dict[str, dict[str, Column]] = {
    "patients": {
        "patient_id": Column("str"),
        "age": Column("float", required=False, check=lambda v: 0 <= v <= 120, check_text="in 0..120 years"),
        "gender": Column("str", required=False, choices=("Male", "Female")),
        **{
            name: Column("str", required=False, choices=YES_NO)
            for name in ("diagemph", "famfather", "fammother", "fambrother", "famsister", "famchild")
        },
    },
    "studies": {
        "study_id": Column("str"),
        "patient_id": Column("str"),
        "study_date": Column("date"),
        "modality": Column("str", choices=MODALITIES),
        "path": Column("str"),
        "mask_path": Column("str", required=False),
        "lung_mask_path": Column("str", required=False),
        "report_text": Column("str", required=False),
    },
    "findings": {
        "study_id": Column("str"),
        "nodule_id": Column("str"),
        "center_x_mm": Column("float"),
        "center_y_mm": Column("float"),
        "center_z_mm": Column("float"),
        "SCT_LONG_DIA": Column("float", check=lambda v: 0 < v <= 300, check_text="in (0, 300] mm"),
        "SCT_PERP_DIA": Column("float", check=lambda v: 0 < v <= 300, check_text="in (0, 300] mm"),
        "SCT_PRE_ATT": Column("str", required=False, choices=ATTENUATIONS),
        "SCT_MARGINS": Column("str", required=False, choices=MARGINS),
        "SCT_EPI_LOC": Column("str", required=False, choices=LOBES),
    },
    "labels": {
        "patient_id": Column("str"),
        "nodule_id": Column("str"),
        "malignant": Column("int01"),
    },
}
KEYS = {
    "patients": ("patient_id",),
    "studies": ("study_id",),
    "findings": ("study_id", "nodule_id"),
    "labels": ("patient_id", "nodule_id"),
}


@dataclass
class Manifest:
    root: Path
    patients: pd.DataFrame
    studies: pd.DataFrame
    findings: pd.DataFrame
    labels: pd.DataFrame

    def table(self, name: str) -> pd.DataFrame:
        return getattr(self, name)

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.root / path

    def fingerprint(self) -> str:
        """Content hash of the four tables (not of the image files): keys caches."""
        digest = hashlib.sha256()
        for name in TABLES:
            frame = self.table(name)
            frame = frame.sort_values(list(KEYS[name])).reset_index(drop=True)
            digest.update(name.encode())
            digest.update(frame.to_csv(index=False).encode())
        return digest.hexdigest()


def plain_value(value: Any) -> Any:
    """A table cell as a plain JSON-serialisable Python value (numpy scalars unwrapped,
    NaN as None = missing): EHR records travel as JSON between pipeline steps."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def _missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and np.isnan(value))
        or value is pd.NaT
        or (isinstance(value, str) and value.strip() == "")
    )


def _convert(value: Any, col: Column) -> Any:
    if col.kind == "str":
        return str(value).strip()
    if col.kind == "float":
        out = float(value)
        if not np.isfinite(out):
            raise ValueError("not a finite number")
        return out
    if col.kind == "int01":
        if isinstance(value, str):
            value = {"true": 1, "false": 0}.get(value.strip().lower(), value)
        out = int(float(value))
        if out not in (0, 1) or float(value) != out:
            raise ValueError("must be 0 or 1")
        return out
    if col.kind == "date":
        return pd.Timestamp(value).date()
    raise AssertionError(col.kind)


def _validate_table(name: str, frame: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    schema = SCHEMA[name]
    missing_cols = [c for c, col in schema.items() if col.required and c not in frame.columns]
    if missing_cols:
        problems.append(f"{name}: missing required column(s) {missing_cols}")
        return frame
    out = {}
    key_col = KEYS[name][0]
    for col_name, col in schema.items():
        values = frame[col_name].tolist() if col_name in frame.columns else [None] * len(frame)
        converted = []
        for row, value in enumerate(values):
            key = frame[key_col].iloc[row] if key_col in frame.columns else "?"
            where = f"{name} row {row} ({key_col}={key}): {col_name}"
            if _missing(value):
                if col.required:
                    problems.append(f"{where}: required value is missing")
                converted.append(None)
                continue
            try:
                v = _convert(value, col)
            except (ValueError, TypeError, ArithmeticError) as exc:  # int(inf), float(10**400): OverflowError
                problems.append(f"{where}: {value!r} is not a valid {col.kind} ({exc})")
                converted.append(None)
                continue
            if col.choices and v not in col.choices:
                problems.append(f"{where}: {v!r} is not one of {list(col.choices)}")
            elif col.check and not col.check(v):
                problems.append(f"{where}: {v!r} must be {col.check_text}")
            converted.append(v)
        out[col_name] = converted
    # Explicit dtypes: pandas >= 3 would turn str/None lists into a string dtype with
    # NaN for missing values; downstream code expects None for a missing string.
    result = pd.DataFrame(
        {c: pd.Series(v, dtype="float64" if schema[c].kind == "float" else object) for c, v in out.items()},
        columns=list(schema),
    )
    dup = result.duplicated(subset=list(KEYS[name]), keep=False)
    for row in np.flatnonzero(dup.to_numpy()):
        keys = {k: result[k].iloc[row] for k in KEYS[name]}
        problems.append(f"{name} row {row}: duplicate key {keys}")
    return result


def _check_references(m: Manifest, problems: list[str]) -> None:
    patients = set(m.patients["patient_id"])
    studies = dict(zip(m.studies["study_id"], m.studies["patient_id"]))
    for row, pid in enumerate(m.studies["patient_id"]):
        if pid is not None and pid not in patients:
            problems.append(
                f"studies row {row} (study_id={m.studies['study_id'].iloc[row]}): "
                f"patient_id: {pid!r} is not in patients"
            )
    for row, sid in enumerate(m.findings["study_id"]):
        if sid is not None and sid not in studies:
            problems.append(f"findings row {row} (study_id={sid}): study_id: not in studies")
    for row, (long_d, perp_d) in enumerate(zip(m.findings["SCT_LONG_DIA"], m.findings["SCT_PERP_DIA"])):
        if long_d is not None and perp_d is not None and perp_d > long_d + 1e-6:
            problems.append(
                f"findings row {row} (study_id={m.findings['study_id'].iloc[row]}): SCT_PERP_DIA: "
                f"{perp_d} exceeds SCT_LONG_DIA {long_d}"
            )
    nodules = {(studies.get(s), n) for s, n in zip(m.findings["study_id"], m.findings["nodule_id"])}
    for row, key in enumerate(zip(m.labels["patient_id"], m.labels["nodule_id"])):
        if None not in key and key not in nodules:
            problems.append(
                f"labels row {row} (patient_id={key[0]}): nodule_id: {key[1]!r} has no finding for this patient"
            )
    for pid in sorted(patients - set(studies.values()), key=str):
        problems.append(f"patients (patient_id={pid}): has no studies")


def _read_table(root: Path, name: str) -> pd.DataFrame:
    for suffix, reader in ((".parquet", pd.read_parquet), (".csv", lambda p: pd.read_csv(p, dtype=str))):
        path = root / f"{name}{suffix}"
        if path.is_file():
            try:
                return reader(path)
            except Exception as exc:  # pyarrow/pandas raise many types for broken files
                raise ManifestError([f"{path}: cannot be read ({type(exc).__name__}: {exc})"]) from exc
    raise ManifestError([f"{root}: no {name}.parquet or {name}.csv"])


def validate_manifest(root: Path, frames: dict[str, pd.DataFrame]) -> Manifest:
    problems: list[str] = []
    tables = {name: _validate_table(name, frames[name], problems) for name in TABLES}
    if problems:
        raise ManifestError(problems)
    manifest = Manifest(root=root, **tables)
    _check_references(manifest, problems)
    if problems:
        raise ManifestError(problems)
    return manifest


def load_manifest(root: str | Path) -> Manifest:
    """Read and validate a manifest folder; raises ManifestError listing all faults."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError([f"{root}: manifest folder does not exist"])
    return validate_manifest(root.resolve(), {name: _read_table(root, name) for name in TABLES})


def write_tables(tables: dict[str, pd.DataFrame], folder: str | Path) -> None:
    """Write the four tables as Parquet into an existing folder (not atomic)."""
    for name in TABLES:
        frame = tables[name].copy()
        if name == "studies":
            frame["study_date"] = pd.to_datetime(frame["study_date"]).dt.date
        frame.to_parquet(Path(folder) / f"{name}.parquet", index=False)


def write_manifest(manifest: Manifest, root: str | Path) -> None:
    """Write a manifest folder atomically (temp folder, then rename)."""
    with atomic_folder(root, overwrite=True) as tmp:
        write_tables({name: manifest.table(name) for name in TABLES}, tmp)
