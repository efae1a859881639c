"""A malformed-input corpus, built here from real pydicom/nibabel files, added to the
tiny synthetic cohort: every hostile study must be quarantined with the reason that
names its fault, every valid study ingested, and the output must hold no non-finite
tensor, no absolute path and nothing half-written.

The readers are checked case by case (no Ray); one ingestion run over the whole
corpus checks the integration (quarantine table, counts, summary)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from dx_fixture import film, write_dx

from cohortcast.config import IngestConfig, PrivacyConfig
from cohortcast.data.errors import StudyError
from cohortcast.data.manifest import EHR_FEATURES, load_manifest, write_tables
from cohortcast.data.privacy import Pseudonymizer
from cohortcast.data.readers import ReadLimits, read_study
from cohortcast.io.dicom import DicomIdentity, write_ct_series
from cohortcast.io.nifti import write_nifti
from cohortcast.io.volume import Volume

# Small limits for the corpus (the tiny cohort's 48 x 48 x 16 studies fit easily),
# so header-declared sizes can be tested without writing gigabytes.
MAX_VOXELS = 1_000_000
MAX_MB = 16
LIMITS = ReadLimits(max_voxels=MAX_VOXELS, max_uncompressed_bytes=MAX_MB * 2**20, config_section="ingest")
TENSORS = (
    "crop",
    "crop_affine",
    "patch",
    "volume",
    "mask",
    "lung_mask",
    "radiograph",
    "radiograph_affine",
    "source_affine",
    "volume_affine",
)
RADIOGRAPH = 16  # radiograph_size of the corpus run
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def base_volume(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 400, size=(6, 16, 16)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-16.0, -16.0, -12.0]
    return Volume(hu, affine)


CENTRE = base_volume().voxel_to_world(np.array([[8.0, 8.0, 3.0]]))[0]


def identity(seed: str) -> DicomIdentity:
    import datetime as dt

    return DicomIdentity(
        "Hostile^Case", "HOSTILE-MRN", dt.date(1950, 1, 1), "F", "ACC-H", "Hostile Inst", dt.date(2004, 5, 6), seed
    )


def series(folder: Path, seed: str = "s") -> list[Path]:
    write_ct_series(base_volume(), folder, identity(seed))
    return sorted(folder.iterdir())


def edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for name, value in tags.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    ds.save_as(path)


def nifti_bytes(shape, dtype=np.int16, data: bytes | None = None) -> bytes:
    """A single-file NIfTI-1 header declaring `shape`, followed by `data`."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_data_offset(352)
    return hdr.binaryblock + b"\x00" * 4 + (data or b"")


# --- the corpus: each builder writes one study under `root / rel` -------------------


def truncated_header_in_series(p: Path):
    victim = series(p)[2]
    victim.write_bytes(victim.read_bytes()[:600])  # ends inside the dataset, before Rows


def truncated_pixels_in_series(p: Path):
    victim = series(p)[3]
    victim.write_bytes(victim.read_bytes()[:-100])


def header_pixel_size_mismatch(p: Path):
    for f in series(p):
        edit(f, Rows=8, Columns=8)  # 16 x 16 pixels stored


def rescale_overflow(p: Path):
    for f in series(p):
        edit(f, RescaleSlope=1e38)  # float32 HU overflow -> Inf


def wrong_modality(p: Path):
    for f in series(p):
        edit(f, Modality="MR")


def dicom_huge_header(p: Path):
    for f in series(p):
        edit(f, Rows=1024, Columns=1024)  # 6 x 1024^2 voxels declared, 16 x 16 stored


def zero_byte_in_series(p: Path):
    series(p)
    (p / "IM0099.dcm").write_bytes(b"")


def empty_folder(p: Path):
    p.mkdir(parents=True)


def only_hidden_files(p: Path):
    p.mkdir(parents=True)
    (p / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def non_dicom_in_series(p: Path):
    series(p)
    (p / "notes.txt").write_text("scanner operator notes, not an image")


def duplicate_sop_uid(p: Path):
    files = series(p)
    shutil.copy(files[2], p / "IM0002_copy.dcm")


def mixed_series(p: Path):
    files = series(p)
    other = pydicom.uid.generate_uid()
    for f in files[:2]:
        edit(f, SeriesInstanceUID=other)


def missing_pixel_data(p: Path):
    edit(series(p)[1], PixelData=None)


def uneven_spacing(p: Path):
    files = series(p)
    ds = pydicom.dcmread(files[-1])
    edit(
        files[-1],
        ImagePositionPatient=[float(v) for v in ds.ImagePositionPatient[:2]]
        + [float(ds.ImagePositionPatient[2]) + 1.5],
    )


def missing_slice(p: Path):
    series(p)[3].unlink()


def non_utf8_names_corrupt(p: Path):
    files = series(p)
    for k, f in enumerate(files):
        os.rename(f, os.fsdecode(bytes(p) + b"/IM\xff\xfe" + str(k).encode() + b".dcm"))
    victim = sorted(p.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-64])


def symlink_loop(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(p.name, p)  # points at itself


def dangling_symlink(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("no_such_study.nii.gz", p)


def unreadable_permissions(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(base_volume(), p)
    p.chmod(0)


def single_file_not_dicom(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("REPORT: no acute findings\n" * 20)


def nifti_(writer: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(p: Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        writer(p)

    build.__name__ = writer.__name__
    return build


@nifti_
def truncated_nifti_gz(p: Path):
    write_nifti(base_volume(), p)
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


@nifti_
def truncated_nifti_plain(p: Path):
    write_nifti(base_volume(), p)
    p.write_bytes(p.read_bytes()[:-700])


@nifti_
def nifti_header_declares_more_than_data(p: Path):
    p.write_bytes(nifti_bytes((16, 16, 10), data=b"\x01\x00" * (16 * 16 * 6)))


@nifti_
def nan_nifti(p: Path):
    vol = base_volume()
    vol.array[2, 5, 5] = np.nan
    write_nifti(vol, p, dtype=np.float32)


@nifti_
def inf_nifti(p: Path):
    vol = base_volume()
    vol.array[1, 3, 4] = -np.inf
    write_nifti(vol, p, dtype=np.float32)


@nifti_
def nifti_huge_header(p: Path):
    # Declares 2048^3 int16 (16 GiB); the file is a few hundred bytes.
    p.write_bytes(gzip.compress(nifti_bytes((2048, 2048, 2048), data=b"\x00" * 4096)))


@nifti_
def gzip_bomb(p: Path):
    # A valid 16 x 16 x 6 image whose gzip stream then runs on for 64 MB of zeros
    # (the file is ~64 KB): more than the header declares, more than the limit.
    payload = nifti_bytes((16, 16, 6), data=np.zeros(16 * 16 * 6, np.int16).tobytes())
    p.write_bytes(gzip.compress(payload + b"\x00" * (64 * 2**20), compresslevel=9))


@nifti_
def zero_byte_nifti(p: Path):
    p.write_bytes(b"")


@nifti_
def not_nifti(p: Path):
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())


@nifti_
def nifti_4d(p: Path):
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6, 2), np.int16), np.diag([2.0, 2.0, 4.0, 1.0])), str(p))


@nifti_
def singular_affine(p: Path):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.zeros((4, 4)), code=1)
    hdr.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.int16), None, header=hdr), str(p))


@nifti_
def zero_dimension(p: Path):
    p.write_bytes(gzip.compress(nifti_bytes((16, 16, 0))))


def valid_non_utf8_names(p: Path):
    for k, f in enumerate(series(p, seed="valid-utf8")):
        os.rename(f, os.fsdecode(bytes(p) + b"/sl\xe9" + str(k).encode() + b".dcm"))


def valid_with_hidden_file(p: Path):
    series(p, seed="valid-hidden")
    (p / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def valid_nifti(p: Path):
    p.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(base_volume(3), p)


# Radiographs (DX: PatientOrientation, ImagerPixelSpacing, no ImageOrientationPatient).
def dx_bad_orientation(p: Path):
    write_dx(p, film(40, 32), patient_orientation=["L", "X"])


def dx_no_imager_spacing(p: Path):
    write_dx(p, film(40, 32), imager_spacing=None)


def dx_truncated_pixels(p: Path):
    write_dx(p, film(40, 32))
    p.write_bytes(p.read_bytes()[:-200])  # a transfer cut short: the header reads, the pixels do not


def valid_dx(p: Path):
    write_dx(p, film(40, 32, markers=[(10, 8)]))


def _lung_mask(p: Path, shape) -> None:
    """A lung mask on base_volume()'s spacing and origin, of the given shape."""
    p.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(shape, np.float32)
    array[1:-1, 2:-2, 2:-2] = 1
    write_nifti(Volume(array, base_volume().affine), p, dtype=np.uint8)


def lung_mask_wrong_grid(p: Path):
    _lung_mask(p, (6, 8, 8))  # the image is 6 x 16 x 16


def valid_lung_mask(p: Path):
    _lung_mask(p, base_volume().shape)


@dataclass
class Case:
    name: str
    rel: str  # manifest-relative path
    reason: str | None  # None: a valid study
    build: Callable[[Path], None]
    kind: str = "study"  # "mask" / "lung_mask": `rel` is the study's (lesion / lung) mask
    needs_non_root: bool = False
    modality: str = "CT"
    image: str | None = None  # a mask case's study image (itself valid)
    grid_fault: bool = False  # the mask reads fine; only its grid contradicts the image's


CASES = [
    Case("truncated_header_in_series", "hostile/truncated_header", "corrupt_file", truncated_header_in_series),
    Case("truncated_pixels_in_series", "hostile/truncated_pixels", "corrupt_file", truncated_pixels_in_series),
    Case("header_pixel_size_mismatch", "hostile/size_mismatch", "corrupt_file", header_pixel_size_mismatch),
    Case("rescale_overflow", "hostile/rescale_overflow", "non_finite_voxels", rescale_overflow),
    Case("wrong_modality", "hostile/mr_as_ct", "modality_mismatch", wrong_modality),
    Case("dicom_huge_header", "hostile/dicom_huge", "too_large", dicom_huge_header),
    Case("zero_byte_in_series", "hostile/zero_byte_in_series", "empty_file", zero_byte_in_series),
    Case("empty_folder", "hostile/empty_folder", "empty_series", empty_folder),
    Case("only_hidden_files", "hostile/only_hidden", "empty_series", only_hidden_files),
    Case("non_dicom_in_series", "hostile/non_dicom_in_series", "not_dicom", non_dicom_in_series),
    Case("duplicate_sop_uid", "hostile/duplicate_sop", "duplicate_instance", duplicate_sop_uid),
    Case("mixed_series", "hostile/mixed_series", "mixed_series", mixed_series),
    Case("missing_pixel_data", "hostile/missing_pixels", "missing_pixel_data", missing_pixel_data),
    Case("uneven_spacing", "hostile/uneven_spacing", "bad_geometry", uneven_spacing),
    Case("missing_slice", "hostile/missing_slice", "bad_geometry", missing_slice),
    Case("non_utf8_names_corrupt", "hostile/non_utf8_corrupt", "corrupt_file", non_utf8_names_corrupt),
    Case("symlink_loop", "hostile/loop.nii.gz", "symlink_loop", symlink_loop),
    Case("dangling_symlink", "hostile/dangling.nii.gz", "missing_path", dangling_symlink),
    Case(
        "unreadable_permissions",
        "hostile/locked.nii.gz",
        "permission_denied",
        unreadable_permissions,
        needs_non_root=True,
    ),
    Case("missing_path", "hostile/never_written", "missing_path", lambda p: None),
    Case("single_file_not_dicom", "hostile/report.dcm", "not_dicom", single_file_not_dicom),
    Case("truncated_nifti_gz", "hostile/truncated.nii.gz", "corrupt_file", truncated_nifti_gz),
    Case("truncated_nifti_plain", "hostile/truncated.nii", "corrupt_file", truncated_nifti_plain),
    Case(
        "nifti_header_declares_more_than_data",
        "hostile/short_data.nii",
        "corrupt_file",
        nifti_header_declares_more_than_data,
    ),
    Case("nan_nifti", "hostile/nan.nii.gz", "non_finite_voxels", nan_nifti),
    Case("inf_nifti", "hostile/inf.nii.gz", "non_finite_voxels", inf_nifti),
    Case("nifti_huge_header", "hostile/huge_header.nii.gz", "too_large", nifti_huge_header),
    Case("gzip_bomb", "hostile/bomb.nii.gz", "too_large", gzip_bomb),
    Case("zero_byte_nifti", "hostile/zero.nii.gz", "empty_file", zero_byte_nifti),
    Case("not_nifti", "hostile/junk.nii", "corrupt_file", not_nifti),
    Case("nifti_4d", "hostile/four_d.nii.gz", "bad_geometry", nifti_4d),
    Case("singular_affine", "hostile/singular.nii.gz", "bad_geometry", singular_affine),
    Case("zero_dimension", "hostile/zero_dim.nii.gz", "bad_geometry", zero_dimension),
    Case(
        "corrupt_mask",
        "hostile/mask_bad/mask.nii.gz",
        "corrupt_file",
        truncated_nifti_gz,
        kind="mask",
        image="hostile/mask_bad/image.nii.gz",
    ),
    Case(
        "lung_mask_wrong_grid",
        "hostile/lung_bad/lung.nii.gz",
        "bad_geometry",
        lung_mask_wrong_grid,
        kind="lung_mask",
        image="hostile/lung_bad/image.nii.gz",
        grid_fault=True,
    ),
    Case("dx_bad_orientation", "hostile/dx_bad_orientation.dcm", "bad_geometry", dx_bad_orientation, modality="DX"),
    Case("dx_no_imager_spacing", "hostile/dx_no_spacing.dcm", "bad_geometry", dx_no_imager_spacing, modality="DX"),
    Case("dx_truncated_pixels", "hostile/dx_truncated.dcm", "corrupt_file", dx_truncated_pixels, modality="DX"),
    Case("valid_non_utf8_names", "hostile/valid_non_utf8", None, valid_non_utf8_names),
    Case("valid_with_hidden_file", "hostile/valid_hidden", None, valid_with_hidden_file),
    Case("valid_nifti", "hostile/valid.nii.gz", None, valid_nifti),
    Case("valid_dx", "hostile/valid_dx.dcm", None, valid_dx, modality="DX"),
    Case(
        "valid_lung_mask",
        "hostile/lung_ok/lung.nii.gz",
        None,
        valid_lung_mask,
        kind="lung_mask",
        image="hostile/lung_ok/image.nii.gz",
    ),
]


def active_cases() -> list[Case]:
    return [c for c in CASES if not (c.needs_non_root and IS_ROOT)]


def test_corpus_is_large_enough():
    hostile = {c.reason for c in active_cases() if c.reason}
    assert len([c for c in active_cases() if c.reason]) >= 25 and len(hostile) >= 12


OUTSIDE = "hostile/valid.nii.gz"  # this valid study also gets a finding outside its image


def add_to_manifest(root: Path, cases: list[Case]) -> None:
    """One new patient per case, one study each, one finding at the image centre (and
    one finding outside the image of OUTSIDE: quarantined itself, not with a study)."""
    m = load_manifest(root)
    patients, studies, findings = [m.patients], [m.studies], [m.findings]
    for k, case in enumerate(cases):
        pid, sid = f"HOSTILE-{k:03d}", f"HOSTILE-ST-{k:03d}"
        patients.append(pd.DataFrame([{"patient_id": pid}]))
        studies.append(
            pd.DataFrame(
                [
                    {
                        "study_id": sid,
                        "patient_id": pid,
                        "study_date": pd.Timestamp("2004-05-06").date(),
                        "modality": case.modality,
                        "path": case.image or case.rel,
                        "mask_path": case.rel if case.kind == "mask" else None,
                        "lung_mask_path": case.rel if case.kind == "lung_mask" else None,
                        "report_text": "",
                    }
                ]
            )
        )
        findings.append(
            pd.DataFrame(
                [
                    {
                        "study_id": sid,
                        "nodule_id": f"N{k}",
                        "center_x_mm": CENTRE[0],
                        "center_y_mm": CENTRE[1],
                        "center_z_mm": CENTRE[2],
                        "SCT_LONG_DIA": 8.0,
                        "SCT_PERP_DIA": 6.0,
                    }
                ]
            )
        )
        if case.rel == OUTSIDE:
            findings.append(
                pd.DataFrame(
                    [
                        {
                            "study_id": sid,
                            "nodule_id": f"N{k}-out",
                            "center_x_mm": CENTRE[0] + 1000,
                            "center_y_mm": CENTRE[1],
                            "center_z_mm": CENTRE[2],
                            "SCT_LONG_DIA": 8.0,
                            "SCT_PERP_DIA": 6.0,
                        }
                    ]
                )
            )
    write_tables(
        {
            "patients": pd.concat(patients, ignore_index=True),
            "studies": pd.concat(studies, ignore_index=True),
            "findings": pd.concat(findings, ignore_index=True),
            "labels": m.labels,
        },
        root,
    )


@pytest.fixture(scope="module")
def hostile(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "manifest"
    shutil.copytree(tiny_cohort, root)
    for case in active_cases():
        if case.image:
            valid_nifti(root / case.image)
        case.build(root / case.rel)
    add_to_manifest(root, active_cases())
    yield root
    for case in active_cases():  # let pytest clean up what chmod locked
        if case.needs_non_root and (root / case.rel).exists():
            (root / case.rel).chmod(0o644)


@pytest.mark.parametrize("case", active_cases(), ids=lambda c: c.name)
def test_reader_names_the_fault(hostile, case):
    path = hostile / (case.image or case.rel)
    if case.reason is None or case.image:
        volume = read_study(path, modality=case.modality, limits=LIMITS)
        assert np.isfinite(volume.array).all() and volume.shape[0] == (1 if case.modality == "DX" else 6)
        if case.image and (case.reason is None or case.grid_fault):  # the mask itself reads
            assert read_study(hostile / case.rel, modality="SEG", limits=LIMITS).shape[0] > 1
        elif case.image:
            with pytest.raises(StudyError) as info:
                read_study(hostile / case.rel, modality="SEG", limits=LIMITS)
            assert info.value.reason == case.reason
        return
    with pytest.raises(StudyError) as info:
        read_study(path, modality=case.modality, limits=LIMITS)
    assert info.value.reason == case.reason, str(info.value)
    assert type(info.value) is not StudyError  # a named subclass, not the catch-all


def test_messages_say_what_and_where(hostile):
    def message(rel, **kw):
        with pytest.raises(StudyError) as info:
            read_study(hostile / rel, modality="CT", limits=LIMITS, **kw)
        return str(info.value)

    assert "IM0002.dcm: header lacks" in message("hostile/truncated_header")
    assert "IM0003.dcm: pixel data is truncated" in message("hostile/truncated_pixels")
    assert "header/pixel size mismatch" in message("hostile/size_mismatch")
    assert "Modality is MR but the study is listed as CT" in message("hostile/mr_as_ct")
    assert "notes.txt: is not a DICOM file" in message("hostile/non_dicom_in_series")
    assert "IM0002.dcm and IM0002_copy.dcm have the same SOPInstanceUID" in message("hostile/duplicate_sop")
    assert "IM0099.dcm: is empty (0 bytes)" in message("hostile/zero_byte_in_series")
    assert "\\xff\\xfe1.dcm: pixel data is truncated" in message("hostile/non_utf8_corrupt")
    huge = message("hostile/huge_header.nii.gz")
    assert "(2048, 2048, 2048)" in huge and "ingest.max_voxels" in huge
    assert "ingest.max_voxels" in message("hostile/dicom_huge")
    assert "decompresses to more than" in message("hostile/bomb.nii.gz")
    assert "NaN or infinite" in message("hostile/nan.nii.gz")
    with pytest.raises(StudyError, match="PatientOrientation value 'X' is not made of distinct letters"):
        read_study(hostile / "hostile/dx_bad_orientation.dcm", modality="DX", limits=LIMITS)
    with pytest.raises(StudyError, match="dx_truncated.dcm: pixel data is truncated"):
        read_study(hostile / "hostile/dx_truncated.dcm", modality="DX", limits=LIMITS)


def test_limits_refuse_from_the_header_before_reading_data(hostile, monkeypatch):
    """The 16 GiB header is refused without a byte of its data being decompressed,
    and the gzip bomb after at most its declared size plus the slack."""
    from cohortcast.data import nifti_reader

    caps = []
    real = nifti_reader._gunzip
    monkeypatch.setattr(nifti_reader, "_gunzip", lambda path, cap: caps.append(cap) or real(path, cap))
    with pytest.raises(StudyError, match="too_large|ingest.max_voxels"):
        read_study(hostile / "hostile/huge_header.nii.gz", limits=LIMITS)
    assert caps == [nifti_reader._HEADER_BYTES]
    caps.clear()
    with pytest.raises(StudyError, match="decompresses to more than"):
        read_study(hostile / "hostile/bomb.nii.gz", limits=LIMITS)
    assert max(caps) <= 352 + 16 * 16 * 6 * 2 + nifti_reader._GZIP_SLACK
    # With default (generous) limits the huge header is still refused: 16 GiB > 4 GiB.
    with pytest.raises(StudyError, match="max_uncompressed|max_voxels"):
        read_study(hostile / "hostile/huge_header.nii.gz")


def test_dicom_limits_are_checked_before_pixels(hostile, monkeypatch):
    from cohortcast.data import dicom_reader

    monkeypatch.setattr(dicom_reader, "_pixels_hu", lambda header: pytest.fail("pixels read before limits"))
    with pytest.raises(StudyError, match="6 slice headers declare 6291456 voxels.*ingest.max_voxels"):
        read_study(hostile / "hostile/dicom_huge", limits=LIMITS)


# --- the process_study / Parquet boundary guards, without Ray ------------------------


def _task(root: Path, rel: str, **kw) -> dict:
    return {
        "patient": "sub-x",
        "study": "ses-x",
        "split": "train",
        "study_date": "2004-05-06",
        "exam_index": 0,
        "num_exams": 1,
        "days_since_baseline": 0,
        "modality": "CT",
        "report_text": "",
        "path": str(root / rel),
        "rel_path": rel,
        "mask_path": "",
        "mask_path_rel": "",
        "findings_json": json.dumps(
            [
                {
                    "nodule_id": "N0",
                    "malignant": 0,
                    "center_x_mm": CENTRE[0],
                    "center_y_mm": CENTRE[1],
                    "center_z_mm": CENTRE[2],
                    **{k: None for k in EHR_FEATURES},
                }
            ]
        ),
        **kw,
    }


def _cfg(**kw) -> IngestConfig:
    return IngestConfig(
        crop_size=16,
        crop_spacing_mm=2.0,
        patch_size=8,
        patch_spacing_mm=3.0,
        volume_shape=(8, 16, 16),
        radiograph_size=RADIOGRAPH,
        max_voxels=MAX_VOXELS,
        max_uncompressed_mb=MAX_MB,
        **kw,
    )


def test_process_study_quarantines_with_relative_messages(hostile):
    from cohortcast.data.study_processing import QUARANTINED, process_study

    for rel, reason in (
        ("hostile/truncated_pixels", "corrupt_file"),
        ("hostile/never_written", "missing_path"),
        ("hostile/huge_header.nii.gz", "too_large"),
        ("hostile/nan.nii.gz", "non_finite_voxels"),
    ):
        result = process_study(_task(hostile, rel), _cfg())
        assert (result["status"], result["reason"]) == (QUARANTINED, reason)
        assert rel in result["message"] and str(hostile) not in result["message"]
        assert "ingest.max_" in result["message"] or reason != "too_large"
    for rel, reason in (
        ("hostile/dx_bad_orientation.dcm", "bad_geometry"),
        ("hostile/dx_no_spacing.dcm", "bad_geometry"),
        ("hostile/dx_truncated.dcm", "corrupt_file"),
    ):
        result = process_study(_task(hostile, rel, modality="DX", dims=2), _cfg())
        assert (result["status"], result["reason"]) == (QUARANTINED, reason)
        assert result["message"].startswith(rel + ": ") and str(hostile) not in result["message"]
    lung = "hostile/lung_bad/lung.nii.gz"
    task = _task(hostile, "hostile/lung_bad/image.nii.gz", lung_mask_path=str(hostile / lung), lung_mask_path_rel=lung)
    result = process_study(task, _cfg())
    assert (result["status"], result["reason"]) == (QUARANTINED, "bad_geometry")
    assert result["message"] == f"{lung}: lung mask grid (6, 8, 8) does not match the image grid (6, 16, 16)"


def test_non_finite_tensor_is_quarantined_before_parquet(hostile, monkeypatch):
    """A volume that got past the readers with NaN (simulated) is quarantined by the
    guard at the end of process_study, and the row builders refuse to emit it."""
    from cohortcast.data import study_processing
    from cohortcast.data.ingest import explode_nodules, study_row

    poisoned = base_volume()
    poisoned.array[3, 8, 8] = np.nan
    monkeypatch.setattr(study_processing, "read_study", lambda *a, **k: poisoned)
    result = study_processing.process_study(_task(hostile, "hostile/valid.nii.gz"), _cfg())
    assert result["status"] == study_processing.QUARANTINED and result["reason"] == "non_finite_voxels"
    assert "patches" in result["message"] and "hostile/valid.nii.gz" in result["message"]
    assert list(explode_nodules(result)) == []
    # The writer boundary itself: an OK-status row with NaN raises, never reaches Parquet.
    result.update(status=study_processing.OK)
    with pytest.raises(ValueError, match="non-finite values in column 'crop'"):
        list(explode_nodules(result))
    with pytest.raises(ValueError, match="non-finite values in column 'volume'"):
        study_row(result)


def test_valid_study_passes_the_guards(hostile):
    from cohortcast.data.study_processing import OK, non_finite_columns, process_study

    result = process_study(_task(hostile, "hostile/valid.nii.gz"), _cfg())
    assert result["status"] == OK and non_finite_columns(result) == [] and len(result["patches"]) == 1


def test_finding_counts_and_summary_add_up():
    """The summary used to say "findings 20: 20 cropped" when only 6 rows were written:
    findings of quarantined studies were counted as cropped."""
    from cohortcast.data.ingest import finding_counts
    from cohortcast.data.prepare import format_summary

    tasks = [{"study": f"ses-{k}", "findings_json": json.dumps([{}] * n)} for k, n in enumerate([3, 4, 5, 8])]
    quarantine = [
        {"study": "ses-1", "nodule_id": None},
        {"study": "ses-3", "nodule_id": None},
        {"study": "ses-2", "nodule_id": "N1"},
        {"study": "ses-2", "nodule_id": "N2"},
    ]
    counts = finding_counts(tasks, quarantine, {"train": 6, "val": 0, "test": 0})
    assert counts == {
        "findings": 20,
        "findings_cropped": 6,
        "findings_with_quarantined_study": 12,
        "findings_quarantined": 2,
    }
    card = {
        "config": {"output": "out"},
        "manifest_fingerprint": "m" * 64,
        "fingerprint": "f" * 64,
        "counts": {
            "patients": 2,
            "studies": 4,
            "studies_ingested": 2,
            "studies_quarantined": 2,
            **counts,
            "nodule_rows": {"train": 6},
            "study_rows": {"train": 2},
        },
        "tables": {"nodules": {"crop": [16, 16], "patch": [8] * 3}, "studies": {"volume": [8, 16, 16]}},
    }
    assert "findings 20: 6 cropped, 12 with their quarantined study, 2 quarantined themselves" in format_summary(card)


def test_read_limits_come_from_the_ingest_config():
    from cohortcast.config import ConfigError
    from cohortcast.data.study_processing import read_limits

    cfg = IngestConfig()
    assert read_limits(cfg) == ReadLimits(512 * 512 * 2048, 4096 * 2**20, "ingest")
    for field in ("max_voxels", "max_uncompressed_mb"):
        with pytest.raises(ConfigError, match=field):
            IngestConfig(**{field: 0}).validate()


def test_scrub_root_removes_the_manifest_folder():
    from cohortcast.data.ingest import scrub_root

    row = {"message": "/data/site-Doe_John/manifest/studies/x: study path does not exist", "nodule_id": None}
    assert scrub_root(row, Path("/data/site-Doe_John/manifest"))["message"] == "studies/x: study path does not exist"


# --- one ingestion run over the whole corpus -----------------------------------------


@pytest.fixture(scope="module")
def ingested(ray_session, hostile, tmp_path_factory):
    from cohortcast.data.ingest import run_ingest

    out = tmp_path_factory.mktemp("hostile-ingest") / "out"
    card = run_ingest(_cfg(manifest=str(hostile), output=str(out), rows_per_file=8))
    return {"card": card, "out": out}


@pytest.mark.ray
def test_ingestion_quarantines_each_hostile_study_with_its_reason(hostile, ingested):
    quarantine = pq.read_table(ingested["out"] / "quarantine.parquet").to_pandas()
    studies = quarantine[quarantine.nodule_id.isna()]
    got = dict(zip(studies.path, studies.reason))
    expected = {(c.image or c.rel): c.reason for c in active_cases() if c.reason}
    assert got == expected
    assert len(studies) == len(expected)  # one row per study, nothing extra
    own = quarantine[quarantine.nodule_id.notna()]
    assert list(zip(own.path, own.reason)) == [(OUTSIDE, "finding_outside_image")]


@pytest.mark.ray
def test_every_valid_study_is_ingested(hostile, ingested):
    m = load_manifest(hostile)
    bad = {c.image or c.rel for c in active_cases() if c.reason}
    valid = m.studies[~m.studies.path.isin(bad)]
    studies = pq.read_table(ingested["out"] / "studies").to_pandas()
    assert len(studies) == len(valid) == ingested["card"]["counts"]["studies_ingested"]
    nodules = pq.read_table(ingested["out"] / "nodules").to_pandas()
    n_valid_findings = int(m.findings.study_id.isin(valid.study_id).sum())
    assert len(nodules) == n_valid_findings - 1  # all but the one outside its image


@pytest.mark.ray
def test_no_tensor_holds_a_non_finite_value(ingested):
    for table in ("nodules", "studies"):
        frame = pq.read_table(ingested["out"] / table).to_pandas()
        for column in TENSORS:
            if column in frame:
                for value in frame[column]:
                    assert np.isfinite(np.asarray(value, dtype=np.float64)).all(), (table, column)


@pytest.mark.ray
def test_no_message_holds_an_absolute_path(hostile, ingested):
    quarantine = pq.read_table(ingested["out"] / "quarantine.parquet").to_pandas()
    for message in quarantine.message:
        assert str(hostile) not in message and str(hostile.resolve()) not in message
        assert not message.startswith("/"), message
    assert (quarantine.path.str.startswith("hostile/")).all()


@pytest.mark.ray
def test_nothing_half_written_and_counts_add_up(ingested):
    from cohortcast.data.prepare import format_summary

    out = ingested["out"]
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    card = json.loads((out / "card.json").read_text())
    assert {"fingerprint", "manifest_fingerprint", "config", "counts", "quarantine_reasons", "tables"} <= set(card)
    assert (card["config"]["max_voxels"], card["config"]["max_uncompressed_mb"]) == (MAX_VOXELS, MAX_MB)
    c = card["counts"]
    assert c["findings"] == c["findings_cropped"] + c["findings_with_quarantined_study"] + c["findings_quarantined"]
    assert c["findings_cropped"] == sum(c["nodule_rows"].values()) == len(pq.read_table(out / "nodules"))
    assert c["studies"] == c["studies_ingested"] + c["studies_quarantined"]
    assert c["findings_with_quarantined_study"] == c["studies_quarantined"]  # one finding per hostile study
    assert sum(card["quarantine_reasons"].values()) == c["studies_quarantined"] + c["findings_quarantined"]
    summary = format_summary(ingested["card"])
    assert (
        f"findings {c['findings']}: {c['findings_cropped']} cropped, {c['findings_with_quarantined_study']} "
        f"with their quarantined study, {c['findings_quarantined']} quarantined themselves"
    ) in summary


@pytest.mark.ray
def test_radiographs_and_lung_masks_reach_the_studies_table(hostile, ingested):
    """Through Ray Data and Parquet: the DX is a dims-2 row with its image and grid, the
    CTs dims-3 rows; the valid lung mask's counts and volume; zeros where absent."""
    studies = pq.read_table(ingested["out"] / "studies").to_pandas()
    m = load_manifest(hostile)
    path_of = dict(zip(m.studies.study_id, m.studies.path))
    pseudo = Pseudonymizer.from_config(PrivacyConfig())
    studies["path"] = studies.study.map({pseudo(s, kind="study"): p for s, p in path_of.items()})
    dx = studies[studies.path == "hostile/valid_dx.dcm"].iloc[0]
    assert dx.dims == 2 and dx.modality == "DX" and (dx.exam_index, dx.num_exams) == (0, 1)
    image = np.asarray(dx.radiograph)
    assert image.shape == (RADIOGRAPH, RADIOGRAPH) and image.min() >= -1 and image.max() <= 1 and image.std() > 0
    affine = np.asarray(dx.radiograph_affine).reshape(4, 4)
    np.testing.assert_allclose(affine[:3, 1] / np.linalg.norm(affine[:3, 1]), [0, 0, -1])  # rows to the feet
    assert not np.asarray(dx.volume).any() and not dx.has_lung_mask and dx.lung_voxels == 0
    assert ((studies.dims == 2) == studies.modality.isin(["DX", "CR"])).all()
    cts = studies[studies.dims == 3]
    assert all(not np.asarray(r).any() for r in cts.radiograph)
    lung = studies[studies.path == "hostile/lung_ok/image.nii.gz"].iloc[0]
    assert lung.has_lung_mask and lung.lung_voxels == np.count_nonzero(np.asarray(lung.lung_mask)) > 0
    assert lung.lung_volume_ml == pytest.approx(4 * 12 * 12 * 2 * 2 * 4 / 1000.0)
    others = cts[cts.path.str.startswith("hostile/") & (cts.path != "hostile/lung_ok/image.nii.gz")]
    assert not others.has_lung_mask.any() and (others.lung_voxels == 0).all() and (others.lung_volume_ml == 0).all()
    assert (cts.mask_volume_ml[~cts.has_mask] == 0).all() and (cts.lung_voxels[~cts.has_lung_mask] == 0).all()
    card = ingested["card"]
    assert card["tables"]["studies"]["radiograph"] == [RADIOGRAPH, RADIOGRAPH]
    assert card["counts"]["study_dims"] == {"volumes": len(cts), "radiographs": len(studies) - len(cts)}
