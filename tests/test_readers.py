"""Readers on real files nobody here wrote (pydicom's and nibabel's test data), on
series assembled from them, and on every kind of broken input."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from cohortcast.data.dicom_reader import read_dicom_file, read_dicom_series
from cohortcast.data.errors import (
    CorruptFileError,
    EmptySeriesError,
    MissingPathError,
    MissingPixelDataError,
    MixedSeriesError,
    ModalityMismatchError,
    NotDicomError,
    SliceGeometryError,
)
from cohortcast.data.nifti_reader import read_nifti
from cohortcast.data.readers import read_study
from cohortcast.io.dicom import DicomIdentity, write_ct_series
from cohortcast.io.nifti import write_nifti
from cohortcast.io.volume import RAS_TO_LPS, Volume

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_ct_small_in_hounsfield_units_with_geometry():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_dicom_file(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert vol.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_allclose(vol.array[0], expected)
    assert vol.modality == "CT"
    np.testing.assert_allclose(vol.origin, [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(vol.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    np.testing.assert_allclose(vol.direction[:, 0], [float(v) for v in ds.ImageOrientationPatient[:3]], atol=1e-6)
    assert not any(str(ds.PatientName) in str(v) for v in vol.metadata.values())


def test_mr_small_reads():
    vol = read_study(get_testdata_file("MR_small.dcm"), modality="MR")
    assert vol.shape == (1, 64, 64) and vol.modality == "MR"


def _series_from_ct_small(folder: Path, n: int = 5, step: float = 2.5, drop=(), duplicate=None, jitter=None):
    """A multi-slice series made of CT_small's real pixels and header, with positions
    along the slice normal; files are written in scrambled order."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in src.ImagePositionPatient])
    order = [3, 0, 4, 1, 2] + list(range(5, n))
    for rank, k in enumerate(order[:n]):
        if k in drop:
            continue
        ds = copy.deepcopy(src)
        offset = k * step + (jitter if jitter is not None and k == n - 1 else 0.0)
        if duplicate is not None and k == duplicate:
            offset = (k - 1) * step
        ds.ImagePositionPatient = [float(v) for v in origin + offset * normal]
        ds.InstanceNumber = rank + 1  # deliberately unrelated to position
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.PixelData = (ds.pixel_array + k).astype(ds.pixel_array.dtype).tobytes()  # slice k is tagged by +k
        ds.save_as(folder / f"file_{rank:02d}.dcm")
    return src, normal, origin


def test_series_is_ordered_by_position_not_file_or_instance_number(tmp_path):
    src, normal, origin = _series_from_ct_small(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s")
    assert vol.shape == (5, src.Rows, src.Columns)
    base = src.pixel_array.astype(np.float64) * float(src.RescaleSlope) + float(src.RescaleIntercept)
    for k in range(5):
        np.testing.assert_allclose(vol.array[k], base + k)
    np.testing.assert_allclose(vol.origin, origin)
    np.testing.assert_allclose(vol.affine[:3, 2], 2.5 * normal, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(drop=(2,)), SliceGeometryError, "missing slice"),
        (dict(duplicate=3), SliceGeometryError, "duplicated slice position"),
        (dict(jitter=1.1), SliceGeometryError, "non-uniform slice spacing"),
    ],
)
def test_series_geometry_errors(tmp_path, kwargs, error, fragment):
    _series_from_ct_small(tmp_path / "s", **kwargs)
    with pytest.raises(error, match=fragment):
        read_dicom_series(tmp_path / "s")


def test_mixed_series_rejected(tmp_path):
    _series_from_ct_small(tmp_path / "s")
    other = tmp_path / "s" / "file_00.dcm"
    ds = pydicom.dcmread(other)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(other)
    with pytest.raises(MixedSeriesError, match="2 different SeriesInstanceUIDs"):
        read_dicom_series(tmp_path / "s")


def test_missing_pixel_data(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(MissingPixelDataError, match="nopix.dcm: has no pixel data"):
        read_study(tmp_path / "nopix.dcm")


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(CorruptFileError, match="pixel data is truncated"):
        read_study(get_testdata_file("MR_truncated.dcm"), modality="MR")  # a real truncated file shipped by pydicom
    (tmp_path / "notes.dcm").write_text("this is not DICOM")
    with pytest.raises(NotDicomError, match="notes.dcm: is not a DICOM file"):
        read_study(tmp_path / "notes.dcm")
    with pytest.raises(MissingPathError):
        read_study(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySeriesError, match="holds no files"):
        read_study(tmp_path / "empty")


def test_dicom_modality_must_match_the_listed_one():
    with pytest.raises(ModalityMismatchError, match="Modality is MR but the study is listed as CT"):
        read_study(get_testdata_file("MR_small.dcm"), modality="CT")
    assert read_study(get_testdata_file("MR_small.dcm"), modality="MR").modality == "MR"


def test_radiograph_uses_imager_pixel_spacing(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "DX"
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, tag)
    ds.ImagerPixelSpacing = [0.139, 0.143]
    ds.save_as(tmp_path / "dx.dcm")
    vol = read_study(tmp_path / "dx.dcm", modality="DX")
    assert vol.shape == (1, 128, 128) and vol.modality == "DX"
    np.testing.assert_allclose(vol.spacing[:2], [0.143, 0.139])


def test_nibabel_anatomical_nifti_keeps_affine():
    path = NIBABEL_DATA / "anatomical.nii"
    img = nib.load(path)
    vol = read_nifti(path)
    np.testing.assert_allclose(vol.array, np.transpose(img.get_fdata(), (2, 1, 0)), rtol=1e-6)
    np.testing.assert_allclose(vol.affine, RAS_TO_LPS @ img.affine)
    # A voxel maps to the same physical point whichever convention names it.
    ijk = np.array([3.0, 7.0, 2.0])
    ras = img.affine @ np.append(ijk, 1.0)
    np.testing.assert_allclose(vol.voxel_to_world(ijk)[0], ras[:3] * [-1, -1, 1])


def test_nifti_errors(tmp_path):
    with pytest.raises(SliceGeometryError, match="expected a 2D or 3D image"):
        read_nifti(NIBABEL_DATA / "example4d.nii.gz")
    raw = (NIBABEL_DATA / "example4d.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CorruptFileError, match="cut.nii.gz"):
        read_nifti(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptFileError):
        read_nifti(tmp_path / "junk.nii")


def _oblique_volume() -> Volume:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(6, 12, 10)).astype(np.float32)
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-120.0, 30.0, -40.0]
    return Volume(hu, affine)


def test_nifti_write_read_round_trip(tmp_path):
    vol = _oblique_volume()
    write_nifti(vol, tmp_path / "v.nii.gz")
    back = read_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)


def test_dicom_series_write_read_round_trip(tmp_path):
    vol = _oblique_volume()
    ident = DicomIdentity(
        "Doe^Jane",
        "MRN1",
        __import__("datetime").date(1950, 1, 2),
        "F",
        "ACC1",
        "Inst",
        __import__("datetime").date(2003, 4, 5),
        "seed",
    )
    write_ct_series(vol, tmp_path / "series", ident)
    back = read_dicom_series(tmp_path / "series")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4)
    # Real DICOM: a stock pydicom read sees a CT image with the expected tags.
    ds = pydicom.dcmread(sorted((tmp_path / "series").iterdir())[0])
    assert ds.SOPClassUID.name == "CT Image Storage" and ds.file_meta.TransferSyntaxUID.is_little_endian


def test_written_uids_are_valid_unique_and_reproducible(tmp_path):
    """The same identity seed writes the same UIDs (a synthetic cohort regenerated with its
    seed is the same cohort); another seed gets other UIDs; each is a valid 2.25 UID."""
    import datetime as dt

    from pydicom.uid import UID

    vol = _oblique_volume()

    def uids(seed: str, folder: str) -> list[tuple[str, str, str]]:
        ident = DicomIdentity("P", "P", None, "O", "", "", dt.date(2003, 4, 5), seed)
        write_ct_series(vol, tmp_path / folder, ident)
        sets = [pydicom.dcmread(p) for p in sorted((tmp_path / folder).iterdir())]
        return [(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID) for d in sets]

    first, again, other = uids("seed-a", "a"), uids("seed-a", "b"), uids("seed-b", "c")
    assert first == again
    assert {u for row in first for u in row}.isdisjoint({u for row in other for u in row})
    sops = [row[2] for row in first]
    assert len(set(sops)) == len(sops)
    for uid in {u for row in first for u in row}:
        assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64
