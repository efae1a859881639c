"""Geometry travels with crops: a crop cut from an oblique CT volume, an oblique single
slice or a radiograph-like coronal image carries the grid it was sampled on, and the
forecast images written from it (NIfTI and DICOM, read back with nibabel and pydicom)
overlay the source in patient space: the centre pixel sits on the nodule, the row and
column directions are the ones the crop was sampled along (the source plane's for a
single 2D image), and every pixel holds the source's value at the place its affine
names."""

import datetime as dt
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cohortcast.data.ingest import explode_nodules
from cohortcast.data.transforms import nodule_crop
from cohortcast.inference.cohort_forecast import case_grid, make_case
from cohortcast.inference.forecast_outputs import write_case_images
from cohortcast.io.crop import Crop, axial_grid_affine
from cohortcast.io.volume import RAS_TO_LPS, Volume

SIZE, SPACING = 16, 1.5
GRADIENT = np.array([3.0, -2.0, 1.5])  # HU per mm: linear interpolation reproduces it exactly


def _rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _hu(points_lps: np.ndarray, origin: np.ndarray) -> np.ndarray:
    return ((points_lps - origin) @ GRADIENT - 300.0).astype(np.float32)


def _source(direction: np.ndarray, spacing, shape, origin) -> Volume:
    """A volume whose HU value is a linear function of the patient position (so any
    pixel's value says where in patient space it was sampled)."""
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, float)
    affine[:3, 3] = origin
    z, y, x = shape
    kk, jj, ii = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    ijk = np.stack([ii, jj, kk], -1).reshape(-1, 3).astype(float)
    volume = Volume(np.zeros(shape, np.float32), affine)
    world = volume.voxel_to_world(ijk)
    return Volume(_hu(world, origin).reshape(shape), affine)


def oblique_ct():
    direction = _rotation([1.0, 0.4, 0.2], 25.0)  # gantry tilt and rotation: no axis along LPS
    volume = _source(direction, (0.8, 0.8, 1.25), (40, 48, 48), np.array([-20.0, -30.0, -25.0]))
    return volume, volume.voxel_to_world([[24.0, 23.0, 20.0]])[0]


def oblique_slice():
    direction = _rotation([0.3, 1.0, -0.5], 40.0)
    volume = _source(direction, (0.7, 0.9, 2.0), (1, 60, 64), np.array([15.0, -10.0, 40.0]))
    return volume, volume.voxel_to_world([[30.0, 28.0, 0.0]])[0]


def radiograph():
    """A PA chest radiograph as one plane: columns along +x (patient left), rows along -z
    (towards the feet), i.e. ImageOrientationPatient (1, 0, 0, 0, 0, -1)."""
    direction = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # columns: i, j, k axes
    volume = _source(direction, (0.5, 0.5, 1.0), (1, 80, 72), np.array([-18.0, 120.0, 30.0]))
    return volume, volume.voxel_to_world([[35.0, 41.0, 0.0]])[0]


def _write(tmp_path, crop: Crop):
    write_case_images(
        tmp_path,
        crop.array,
        np.ones_like(crop.array),
        np.stack([crop.array] * 2),
        crop.affine,
        subject="sub-x",
        case_key="k",
        target_date=dt.date(2020, 1, 1),
        dicom=True,
    )
    nifti = nib.load(str(tmp_path / "mean.nii.gz"))
    lps = RAS_TO_LPS @ nifti.affine
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    assert len(files) == 1
    return lps, np.asarray(nifti.dataobj)[:, :, 0].T, pydicom.dcmread(files[0])


def _check_overlay(lps, image, header, volume, centre, column_axis, row_axis):
    middle = (SIZE - 1) / 2.0
    # NIfTI: the crop's centre pixel is the nodule centre, the axes are the crop's.
    np.testing.assert_allclose((lps @ [middle, middle, 0.0, 1.0])[:3], centre, atol=1e-4)
    np.testing.assert_allclose(lps[:3, 0], SPACING * column_axis, atol=1e-6)
    np.testing.assert_allclose(lps[:3, 1], SPACING * row_axis, atol=1e-6)
    # Every pixel holds the source's value where the written affine puts it.
    jj, ii = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    world = np.stack([ii, jj, np.zeros_like(ii), np.ones_like(ii)], -1).reshape(-1, 4) @ lps.T
    np.testing.assert_allclose(image.reshape(-1), _hu(world[:, :3], volume.origin), atol=1e-2)
    # DICOM: the same plane, position and spacing.
    orientation = np.asarray(header.ImageOrientationPatient, float)
    np.testing.assert_allclose(orientation[:3], column_axis, atol=1e-6)
    np.testing.assert_allclose(orientation[3:], row_axis, atol=1e-6)
    position = np.asarray(header.ImagePositionPatient, float)
    spacing = np.asarray(header.PixelSpacing, float)  # (row, column)
    at_middle = position + middle * spacing[1] * orientation[:3] + middle * spacing[0] * orientation[3:]
    np.testing.assert_allclose(at_middle, centre, atol=1e-4)


def test_oblique_ct_crop_is_axial_and_overlays_its_source(tmp_path):
    """A 3D study is cropped on the axial LPS grid whatever its orientation (so crops of
    differently tilted scans share axes); the outputs say exactly that grid."""
    volume, centre = oblique_ct()
    crop = nodule_crop(volume, centre, SIZE, SPACING)
    np.testing.assert_allclose(crop.centre_lps, centre, atol=1e-9)
    np.testing.assert_allclose(crop.affine, axial_grid_affine(centre, SIZE, SPACING), atol=1e-12)
    lps, image, header = _write(tmp_path, crop)
    _check_overlay(lps, image, header, volume, centre, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    assert header.ImageType[2] == "AXIAL"


@pytest.mark.parametrize("source", [oblique_slice, radiograph], ids=["oblique-slice", "radiograph"])
def test_single_plane_crop_lies_in_the_source_plane(tmp_path, source):
    volume, centre = source()
    crop = nodule_crop(volume, centre, SIZE, SPACING)
    column_axis, row_axis = volume.direction[:, 0], volume.direction[:, 1]
    lps, image, header = _write(tmp_path, crop)
    _check_overlay(lps, image, header, volume, centre, column_axis, row_axis)
    if source is radiograph:
        np.testing.assert_allclose(header.ImageOrientationPatient, [1, 0, 0, 0, 0, -1], atol=1e-9)
        assert header.ImageType[2] == "OTHER"  # not an axial image any more


def test_off_plane_centre_is_projected_where_the_image_was_read(tmp_path):
    """A radiograph finding's depth is not in the image: the crop is read where the
    centre projects onto the plane, and its grid says so."""
    volume, centre = radiograph()
    off = centre + 30.0 * volume.direction[:, 2]
    crop = nodule_crop(volume, off, SIZE, SPACING)
    np.testing.assert_allclose(crop.array, nodule_crop(volume, centre, SIZE, SPACING).array, atol=1e-4)
    np.testing.assert_allclose(crop.centre_lps, centre, atol=1e-9)


def test_ingested_rows_and_cases_carry_the_crop_affine():
    volume, centre = radiograph()
    crop = nodule_crop(volume, centre, SIZE, SPACING)
    finding = {
        "nodule_id": "N1",
        "malignant": 0,
        "status": "ok",
        **dict(zip(("center_x_mm", "center_y_mm", "center_z_mm"), centre)),
    }
    from cohortcast.data.manifest import EHR_FEATURES

    finding.update({k: 0.0 for k in EHR_FEATURES})
    result = {
        "status": "ok",
        "patient": "sub-1",
        "study": "st-1",
        "split": "train",
        "study_date": "2020-01-01",
        "days_since_baseline": 0,
        "exam_index": 0,
        "num_exams": 2,
        "modality": "DX",
        "findings_json": json.dumps([finding]),
        "crops": crop.array[None],
        "crop_affines": crop.affine.reshape(1, 16),
        "patches": np.zeros((1, 2, 2, 2), np.float32),
    }
    [row] = list(explode_nodules(result))
    np.testing.assert_array_equal(np.asarray(row["crop_affine"]).reshape(4, 4), crop.affine)

    group = {k: np.asarray([row[k], row[k]]) for k in row}
    group["days_since_baseline"] = np.asarray([0, 365])
    group["crop"] = np.stack([crop.array, crop.array])
    case = make_case(group)
    np.testing.assert_array_equal(case_grid(case["crop_affine"][0], case["centre_lps"][0], SIZE, SPACING), crop.affine)
    # A cohort ingested before crops kept their grid: the axial guess, as before.
    del group["crop_affine"]
    case = make_case(group)
    np.testing.assert_allclose(
        case_grid(case["crop_affine"][0], case["centre_lps"][0], SIZE, SPACING),
        axial_grid_affine(centre, SIZE, SPACING),
    )
