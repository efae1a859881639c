"""Whole-study ingestion without Ray: radiographs (DX geometry from PatientOrientation,
the square anti-aliased image and its affine), lung and lesion masks with their
volumes, and the per-dims exam numbering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dx_fixture import film, write_dx

from cohortcast.config import IngestConfig
from cohortcast.data.dicom_reader import orientation_from_patient_orientation
from cohortcast.data.errors import SliceGeometryError, StudyError
from cohortcast.data.ingest import build_tasks, study_row
from cohortcast.data.manifest import load_manifest, validate_manifest
from cohortcast.data.privacy import Pseudonymizer
from cohortcast.data.radiograph import radiograph_image
from cohortcast.data.readers import read_study
from cohortcast.data.study_processing import OK, QUARANTINED, process_study
from cohortcast.io.nifti import write_nifti
from cohortcast.io.volume import Volume

R = 32
ROW_MM, COL_MM = 0.5, 0.6  # ImagerPixelSpacing is (row, column)


def cfg(**kw) -> IngestConfig:
    base = dict(crop_size=16, crop_spacing_mm=2.0, patch_size=8, volume_shape=(8, 16, 16), radiograph_size=R)
    return IngestConfig(**{**base, **kw})


def task(path, rel, modality="DX", **kw) -> dict:
    return {
        "patient": "sub-x",
        "study": "stu-x",
        "split": "train",
        "study_date": "2004-05-06",
        "exam_index": 0,
        "num_exams": 1,
        "days_since_baseline": 0,
        "modality": modality,
        "dims": 2 if modality == "DX" else 3,
        "report_text": "",
        "path": str(path),
        "rel_path": rel,
        "findings_json": "[]",
        **kw,
    }


def marker_lps(row: int, col: int) -> np.ndarray:
    """Where pixel (row, col) of an ["L", "F"] film lies: origin 0, columns to +x, rows to -z."""
    return np.array([col * COL_MM, 0.0, -row * ROW_MM])


def to_lps(affine16: np.ndarray, col: float, row: float) -> np.ndarray:
    return (np.asarray(affine16).reshape(4, 4) @ np.array([col, row, 0.0, 1.0]))[:3]


def test_patient_orientation_letters_become_direction_cosines(tmp_path):
    np.testing.assert_allclose(orientation_from_patient_orientation(("L", "F"), tmp_path), [1, 0, 0, 0, 0, -1])
    np.testing.assert_allclose(orientation_from_patient_orientation(("P", "H"), tmp_path), [0, 1, 0, 0, 0, 1])
    oblique = orientation_from_patient_orientation(("LF", "FR"), tmp_path)
    np.testing.assert_allclose(oblique[:3], np.array([1, 0, -1]) / np.sqrt(2))
    assert abs(oblique[:3] @ oblique[3:]) < 1e-9 and np.isclose(np.linalg.norm(oblique[3:]), 1.0)
    for bad, fragment in (
        (("L",), "expected 2"),
        (("L", "Q"), "letters from"),
        (("LR", "F"), "opposite"),
        (("L", "R"), "same axis"),
        (("LL", "F"), "distinct letters"),
    ):
        with pytest.raises(SliceGeometryError, match=fragment):
            orientation_from_patient_orientation(bad, tmp_path / "dx.dcm")


def test_dx_reads_with_its_patient_orientation(tmp_path):
    path = write_dx(tmp_path / "dx.dcm", film())
    volume = read_study(path, modality="DX")
    assert volume.shape == (1, 120, 96)
    np.testing.assert_allclose(volume.direction[:, 0], [1, 0, 0])  # along a row: patient left
    np.testing.assert_allclose(volume.direction[:, 1], [0, 0, -1])  # down a column: feet
    np.testing.assert_allclose(volume.spacing[:2], [COL_MM, ROW_MM])
    np.testing.assert_allclose(volume.origin, 0.0)
    np.testing.assert_allclose(volume.array[0, 0, 0], film()[0, 0] * 2.0 - 100.0)  # rescale applied


def test_marker_maps_through_radiograph_affine_to_its_lps_point(tmp_path):
    top, bottom = (14, 30), (104, 70)
    path = write_dx(tmp_path / "dx.dcm", film(markers=[top, bottom]))
    result = process_study(task(path, "dx/dx.dcm"), cfg())
    assert result["status"] == OK and int(result["dims"]) == 2
    image = result["radiograph"]
    assert image.shape == (R, R) and image.min() >= -1.0 and image.max() <= 1.0
    assert not result["volume"].any() and not result["volume_affine"].any()
    spacing = max(120 * ROW_MM, 96 * COL_MM) / R  # the longer side (rows, 60 mm) fills the grid
    found = []
    for rows in (slice(0, R // 2), slice(R // 2, R)):  # the brightest output pixel of each half
        half = image[rows]
        r, c = np.unravel_index(np.argmax(half), half.shape)
        found.append(to_lps(result["radiograph_affine"], c, r + rows.start))
    for got, marker in zip(found, (top, bottom)):
        assert np.linalg.norm(got - marker_lps(*marker)) < spacing, (got, marker_lps(*marker))
    assert found[0][2] > found[1][2]  # the top of the film is nearer the head
    # The grid: square pixels of `spacing` mm along the film's own axes, rows towards the feet.
    affine = np.asarray(result["radiograph_affine"]).reshape(4, 4)
    np.testing.assert_allclose(affine[:3, 0], [spacing, 0, 0], atol=1e-9)
    np.testing.assert_allclose(affine[:3, 1], [0, 0, -spacing], atol=1e-9)
    row = study_row(result)
    assert row["radiograph"].shape == (R, R) and row["dims"] == 2


def test_shorter_side_is_padded_black_and_monochrome1_is_inverted(tmp_path):
    stored = film(rows=60, cols=120)  # 30 mm x 72 mm: rows padded top and bottom
    image = process_study(task(write_dx(tmp_path / "a.dcm", stored), "a.dcm"), cfg())["radiograph"]
    filled = 30.0 / 72.0 * R
    pad = int(np.floor((R - filled) / 2)) - 1
    assert (image[:pad] == -1).all() and (image[-pad:] == -1).all()
    assert np.abs(image[R // 2 - 2 : R // 2 + 2]).mean() < 0.5  # the film: noise averages to mid-grey
    inverted = film(rows=60, cols=120)
    inverted[28:33, 58:63] = 50  # dark on a MONOCHROME1 film: displayed white
    vol = read_study(write_dx(tmp_path / "m1.dcm", inverted, photometric="MONOCHROME1"), modality="DX")
    out = radiograph_image(vol, R).array
    r, c = np.unravel_index(np.argmax(out), out.shape)
    assert abs(r - (R - 1) / 2) <= 1 and abs(c - (R - 1) / 2) <= 1


def test_radiograph_antialiasing_averages_fine_detail(tmp_path):
    """A 1-pixel checkerboard film shrunk 4x: grey with the prefilter, not +-1 noise."""
    rows, cols = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
    checker = Volume(np.where((rows + cols) % 2 == 0, 1000.0, 0.0)[None].astype(np.float32), np.eye(4))
    smooth = radiograph_image(checker, 32).array
    assert np.abs(smooth[2:-2, 2:-2]).max() < 0.05
    sharp = radiograph_image(checker, 42, antialias=False).array  # factor 3.05: samples near one pixel
    assert np.abs(sharp).max() > 0.5


def _ct(tmp_path, name="ct.nii.gz"):
    hu = np.full((6, 16, 16), -800.0, np.float32)
    affine = np.diag([2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = [-16.0, -16.0, -12.0]
    volume = Volume(hu, affine)
    write_nifti(volume, tmp_path / name)
    return volume


def _mask(tmp_path, name, volume, box) -> int:
    array = np.zeros(volume.shape, np.float32)
    array[box] = 1
    write_nifti(Volume(array, volume.affine), tmp_path / name, dtype=np.uint8)
    return int(array.sum())


def test_ct_masks_and_their_volumes(tmp_path):
    volume = _ct(tmp_path)
    lung = _mask(tmp_path, "lung.nii.gz", volume, np.s_[1:5, 2:14, 2:14])
    lesion = _mask(tmp_path, "ild.nii.gz", volume, np.s_[2:4, 4:8, 4:8])
    t = task(
        tmp_path / "ct.nii.gz",
        "ct.nii.gz",
        modality="CT",
        mask_path=str(tmp_path / "ild.nii.gz"),
        mask_path_rel="ild.nii.gz",
        lung_mask_path=str(tmp_path / "lung.nii.gz"),
        lung_mask_path_rel="lung.nii.gz",
    )
    result = process_study(t, cfg())
    assert result["status"] == OK and int(result["dims"]) == 3
    assert result["has_mask"] and result["has_lung_mask"]
    voxel_ml = 2.0 * 2.0 * 4.0 / 1000.0
    assert result["lung_volume_ml"] == pytest.approx(lung * voxel_ml)
    assert result["mask_volume_ml"] == pytest.approx(lesion * voxel_ml)
    # 16 x 16 x 6 -> 16 x 16 x 8 nearest-neighbour: the lung's rows and columns as they
    # were, slices 1..4 of 6 -> 6 of 8 (every new slice centre falls in one old slice).
    assert result["lung_voxels"] == np.count_nonzero(result["lung_mask"]) == 6 * 12 * 12
    assert set(np.unique(result["lung_mask"])) == {0, 1}
    assert not result["radiograph"].any() and not result["radiograph_affine"].any()
    row = study_row(result)
    assert row["has_lung_mask"] and row["lung_mask"].shape == (8, 16, 16)


def test_one_slice_ct_is_a_dims_2_row_not_skipped(tmp_path):
    """A one-slice CT (an axial NIfTI here) used to get no volume; now it is a 2D image
    on its own plane: columns along +x, rows along +y (posterior), the study's masks unread."""
    hu = np.full((1, 20, 30), -800.0, np.float32)
    hu[0, 5:8, 20:23] = 400.0  # a bright spot right of centre, in the upper rows
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    write_nifti(Volume(hu, affine), tmp_path / "slice.nii.gz")
    result = process_study(task(tmp_path / "slice.nii.gz", "slice.nii.gz", modality="CT"), cfg())
    assert result["status"] == OK and int(result["dims"]) == 2
    assert not result["volume"].any() and not result["volume_affine"].any() and not result["has_lung_mask"]
    image, grid = result["radiograph"], np.asarray(result["radiograph_affine"]).reshape(4, 4)
    spacing = 30 * 0.8 / R
    np.testing.assert_allclose(grid[:3, 0], [spacing, 0, 0], atol=1e-9)
    np.testing.assert_allclose(grid[:3, 1], [0, spacing, 0], atol=1e-9)
    r, c = np.unravel_index(np.argmax(image), image.shape)
    np.testing.assert_allclose(to_lps(grid, c, r)[:2], [21 * 0.8, 6 * 0.8], atol=spacing)


def test_lung_mask_on_another_grid_is_quarantined_naming_it(tmp_path):
    volume = _ct(tmp_path)
    shifted = Volume(np.ones(volume.shape, np.float32), volume.affine.copy())
    shifted.affine[:3, 3] += [0.0, 0.0, 4.0]
    write_nifti(shifted, tmp_path / "lung_shifted.nii.gz", dtype=np.uint8)
    small = Volume(np.ones((6, 8, 8), np.float32), volume.affine)
    write_nifti(small, tmp_path / "lung_small.nii.gz", dtype=np.uint8)
    for name, fragment in (("lung_shifted", "lung mask affine differs"), ("lung_small", "lung mask grid (6, 8, 8)")):
        t = task(
            tmp_path / "ct.nii.gz",
            "ct.nii.gz",
            modality="CT",
            lung_mask_path=str(tmp_path / f"{name}.nii.gz"),
            lung_mask_path_rel=f"masks/{name}.nii.gz",
        )
        result = process_study(t, cfg())
        assert (result["status"], result["reason"]) == (QUARANTINED, "bad_geometry")
        assert result["message"].startswith(f"masks/{name}.nii.gz: ") and fragment in result["message"]
        assert str(tmp_path) not in result["message"]


def test_missing_lung_mask_message_names_the_relative_path(tmp_path):
    _ct(tmp_path)
    t = task(
        tmp_path / "ct.nii.gz",
        "ct.nii.gz",
        modality="CT",
        lung_mask_path=str(tmp_path / "gone.nii.gz"),
        lung_mask_path_rel="masks/gone.nii.gz",
    )
    result = process_study(t, cfg())
    assert (result["status"], result["reason"]) == (QUARANTINED, "missing_path")
    assert "masks/gone.nii.gz" in result["message"] and str(tmp_path) not in result["message"]


def test_bad_dx_geometry_is_refused_before_pixels(tmp_path):
    bad = write_dx(tmp_path / "bad.dcm", film(), patient_orientation=["L", "X"])
    no_spacing = write_dx(tmp_path / "nosp.dcm", film(), imager_spacing=None)
    for path, fragment in ((bad, "'X' is not made of distinct letters"), (no_spacing, "no PixelSpacing or Imager")):
        result = process_study(task(path, f"dx/{path.name}"), cfg())
        assert (result["status"], result["reason"]) == (QUARANTINED, "bad_geometry")
        assert result["message"].startswith(f"dx/{path.name}: ") and fragment in result["message"]
    with pytest.raises(StudyError):
        read_study(bad, modality="DX")


def _manifest(studies: list[tuple[str, str, str, str]]):
    """(patient, study, date, modality) rows -> a validated Manifest (paths need not exist)."""
    patients = sorted({p for p, *_ in studies})
    frames = {
        "patients": pd.DataFrame({"patient_id": patients}),
        "studies": pd.DataFrame(
            [
                {"study_id": s, "patient_id": p, "study_date": d, "modality": m, "path": f"{s}.dcm"}
                for p, s, d, m in studies
            ]
        ),
        "findings": pd.DataFrame(
            columns=["study_id", "nodule_id", "center_x_mm", "center_y_mm", "center_z_mm", "SCT_LONG_DIA"]
            + ["SCT_PERP_DIA"]
        ),
        "labels": pd.DataFrame(columns=["patient_id", "nodule_id", "malignant"]),
    }
    return validate_manifest(Path("/nowhere"), frames)


def test_exams_are_numbered_per_dims_by_date():
    manifest = _manifest(
        [
            ("P1", "ct3", "2003-01-01", "CT"),
            ("P1", "dx1", "2001-01-01", "DX"),
            ("P1", "ct1", "2001-01-01", "CT"),
            ("P1", "dx2", "2002-01-01", "CR"),
            ("P1", "ct2", "2002-01-01", "CT"),
            ("P1", "dx4", "2004-01-01", "DX"),
            ("P2", "ct9", "2005-06-01", "CT"),
        ]
    )
    pseudo = Pseudonymizer("t")
    tasks = {t["rel_path"]: t for t in build_tasks(manifest, pseudo, cfg())}
    got = {k[:-4]: (t["dims"], t["exam_index"], t["num_exams"]) for k, t in tasks.items()}
    assert got == {
        "ct1": (3, 0, 3),
        "ct2": (3, 1, 3),
        "ct3": (3, 2, 3),
        "dx1": (2, 0, 3),
        "dx2": (2, 1, 3),
        "dx4": (2, 2, 3),
        "ct9": (3, 0, 1),
    }
    # Days count from the patient's first study of any kind; the same-date pair agrees.
    assert tasks["dx4.dcm"]["days_since_baseline"] == (pd.Timestamp("2004-01-01") - pd.Timestamp("2001-01-01")).days
    assert tasks["ct1.dcm"]["days_since_baseline"] == tasks["dx1.dcm"]["days_since_baseline"] == 0


def test_ct_exam_numbers_are_those_of_a_ct_only_cohort(tiny_cohort):
    """The NAMD nodule rows take exam_index/num_exams from here: the CTs of a patient
    are numbered in date order over the patient's CTs, as before radiographs existed
    (a CT-only cohort: every study of the patient)."""
    manifest = load_manifest(tiny_cohort)
    tasks = build_tasks(manifest, Pseudonymizer("t"), cfg())
    cts = manifest.studies[manifest.studies.modality == "CT"]
    assert sum(t["dims"] == 3 for t in tasks) == len(cts) > 0
    for patient in {t["patient"] for t in tasks}:
        mine = [t for t in tasks if t["patient"] == patient and t["dims"] == 3]
        assert [t["exam_index"] for t in mine] == list(range(len(mine)))
        assert {t["num_exams"] for t in mine} == {len(mine)}
        assert [t["study_date"] for t in mine] == sorted(t["study_date"] for t in mine)
