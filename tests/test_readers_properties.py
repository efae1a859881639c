"""Property-based: whatever bytes a study file holds, read_study either refuses it with
a StudyError or returns a Volume with finite voxels and affine; whatever values the
manifest's fields hold, validation returns a Manifest or raises ManifestError.

Inputs are arbitrary bytes and real files (pydicom / nibabel written) with bytes
overwritten and tails cut, so the parsers get past their magic numbers. Examples are
bounded (and no example database is written into the repository)."""

from __future__ import annotations

import datetime as dt
import functools
import gzip
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohortcast.data.errors import StudyError
from cohortcast.data.manifest import SCHEMA, ManifestError, validate_manifest
from cohortcast.data.readers import ReadLimits, read_study
from cohortcast.io.dicom import DicomIdentity, write_ct_series
from cohortcast.io.nifti import write_nifti
from cohortcast.io.volume import Volume

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A mutated header may declare any size: keep what an example may allocate small.
LIMITS = ReadLimits(max_voxels=4_000_000, max_uncompressed_bytes=64 * 2**20)


def _volume(slices: int = 3) -> Volume:
    hu = np.linspace(-1000, 400, slices * 16 * 16, dtype=np.float32).reshape(slices, 16, 16)
    return Volume(hu, np.diag([1.5, 1.5, 3.0, 1.0]))


@functools.cache
def base_series() -> tuple[bytes, ...]:
    """The files of a real 3-slice CT series (a few hundred bytes of header each)."""
    with tempfile.TemporaryDirectory() as tmp:
        ident = DicomIdentity("Prop^Erty", "MRN", dt.date(1960, 1, 1), "M", "ACC", "Inst", dt.date(2005, 1, 1), "p")
        write_ct_series(_volume(), Path(tmp) / "s", ident)
        return tuple(p.read_bytes() for p in sorted((Path(tmp) / "s").iterdir()))


@functools.cache
def base_nifti() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        write_nifti(_volume(), Path(tmp) / "v.nii")
        return (Path(tmp) / "v.nii").read_bytes()


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """`base` with a few bytes overwritten (biased to the header) and maybe cut short."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        end = draw(st.sampled_from([min(len(data), 600), len(data)]))
        data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return bytes(data if cut is None else data[:cut])


def read_or_refuse(folder: Path, files: dict[str, bytes], target: str, modality: str = "CT") -> None:
    """The property: a StudyError (with a reason code) or a finite Volume, nothing else."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom/nibabel warn about every damaged field
            volume = read_study(folder / target, modality=modality, limits=LIMITS)
    except StudyError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        str(exc).encode("utf-8")  # printable: goes into Parquet as is
        return
    assert np.isfinite(volume.array).all() and np.isfinite(volume.affine).all()
    assert volume.array.ndim == 3 and volume.array.size >= 1


@PROPERTY
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".dcm", ".nii", ".nii.gz"]))
def test_arbitrary_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        read_or_refuse(Path(tmp), {f"study{suffix}": data}, f"study{suffix}")


@PROPERTY
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_gzipped_as_nii_gz(data):
    with tempfile.TemporaryDirectory() as tmp:
        read_or_refuse(Path(tmp), {"study.nii.gz": gzip.compress(data)}, "study.nii.gz")


@PROPERTY
@given(data=st.data(), gz=st.booleans())
def test_mutated_nifti(data, gz):
    raw = data.draw(mutated(base_nifti()))
    name = "study.nii.gz" if gz else "study.nii"
    with tempfile.TemporaryDirectory() as tmp:
        read_or_refuse(Path(tmp), {name: gzip.compress(raw) if gz else raw}, name)


@PROPERTY
@given(data=st.data())
def test_mutated_dicom_file(data):
    raw = data.draw(mutated(base_series()[0]))
    with tempfile.TemporaryDirectory() as tmp:
        read_or_refuse(Path(tmp), {"slice.dcm": raw}, "slice.dcm")


@PROPERTY
@given(data=st.data(), victim=st.integers(0, 2))
def test_mutated_file_in_dicom_series(data, victim):
    files = list(base_series())
    files[victim] = data.draw(mutated(files[victim]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "series").mkdir()
        read_or_refuse(Path(tmp), {f"series/IM{k:04d}.dcm": f for k, f in enumerate(files)}, "series")


def test_unmutated_bases_read():
    """The properties above start from files that do read (else they test nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "s").mkdir()
        for k, raw in enumerate(base_series()):
            (folder / "s" / f"IM{k}.dcm").write_bytes(raw)
        (folder / "v.nii").write_bytes(base_nifti())
        assert read_study(folder / "s", limits=LIMITS).shape == (3, 16, 16)
        assert read_study(folder / "v.nii", limits=LIMITS).shape == (3, 16, 16)


# --- manifest validation -------------------------------------------------------------

BASE_MANIFEST = {
    "patients": [
        {
            "patient_id": "P1",
            "age": 61.0,
            "gender": "Male",
            "diagemph": "No",
            "famfather": "No",
            "fammother": "Yes",
            "fambrother": "No",
            "famsister": "No",
            "famchild": "No",
        }
    ],
    "studies": [
        {
            "study_id": "S1",
            "patient_id": "P1",
            "study_date": "2004-01-02",
            "modality": "CT",
            "path": "s1",
            "mask_path": None,
            "report_text": "No change.",
        }
    ],
    "findings": [
        {
            "study_id": "S1",
            "nodule_id": "N1",
            "center_x_mm": 1.0,
            "center_y_mm": 2.0,
            "center_z_mm": 3.0,
            "SCT_LONG_DIA": 8.0,
            "SCT_PERP_DIA": 6.0,
            "SCT_PRE_ATT": "Soft Tissue",
            "SCT_MARGINS": "Smooth",
            "SCT_EPI_LOC": "Lingula",
        }
    ],
    "labels": [{"patient_id": "P1", "nodule_id": "N1", "malignant": 1}],
}
FIELDS = [(table, column) for table, columns in SCHEMA.items() for column in columns]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**30), 10**30).map(lambda v: v * 10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.binary(max_size=12),
    st.dates(),
    st.datetimes(),
    st.just(pd.NaT),
    st.just(pd.NA),
    st.just(np.float32("nan")),
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "Yes",
            "true",
            "2004-13-45",
            "P1",
            "S1",
            "N1",
            "0",
            "1",
            "-0.0",
            "10000-01-01",
            "CT",
            "MR",
        ]
    ),
)


def test_base_manifest_is_valid():
    validate_manifest(Path("/m"), {name: pd.DataFrame(rows) for name, rows in BASE_MANIFEST.items()})


@PROPERTY
@given(
    edits=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), max_size=6),
    drops=st.lists(st.sampled_from(FIELDS), max_size=2),
    duplicate=st.sampled_from([None, *SCHEMA]),
)
def test_manifest_validation_never_crashes(edits, drops, duplicate):
    frames = {name: pd.DataFrame(rows) for name, rows in BASE_MANIFEST.items()}
    if duplicate:
        frames[duplicate] = pd.concat([frames[duplicate]] * 2, ignore_index=True)
    for (table, column), value in edits:
        frames[table][column] = pd.Series([value] * len(frames[table]), dtype=object)
    for table, column in drops:
        frames[table] = frames[table].drop(columns=[column], errors="ignore")
    try:
        manifest = validate_manifest(Path("/m"), frames)
    except ManifestError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        return
    assert len(manifest.fingerprint()) == 64
