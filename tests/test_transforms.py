import numpy as np
import pytest

from cohortcast.data.errors import FindingOutsideImageError
from cohortcast.data.transforms import check_inside, nodule_crop, patch_3d, resample_to_shape, window
from cohortcast.io.volume import Volume


def _volume_with_blob(affine, shape=(20, 40, 50), at_ijk=(31, 12, 9)):
    arr = np.full(shape, -1000.0, np.float32)
    i, j, k = at_ijk
    arr[k, j, i] = 1000.0
    return Volume(arr, affine), np.array(at_ijk, float)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_patch_are_centred_in_world_space(flip):
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    if flip:  # x and y reversed: the crop must still come out in LPS orientation
        affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    vol, ijk = _volume_with_blob(affine)
    centre = vol.voxel_to_world(ijk)[0]
    crop = nodule_crop(vol, centre, size=9, spacing_mm=0.8).array
    assert np.unravel_index(np.argmax(crop), crop.shape) == (4, 4)
    assert crop[4, 4] == pytest.approx(1000.0)
    # Off-centre by one pixel in +x (patient left): peak moves one column left of centre.
    crop = nodule_crop(vol, centre + [0.8, 0.0, 0.0], size=9, spacing_mm=0.8).array
    assert np.unravel_index(np.argmax(crop), crop.shape) == (4, 3)
    patch = patch_3d(vol, centre, size=5, spacing_mm=2.0)
    assert np.unravel_index(np.argmax(patch), patch.shape) == (2, 2, 2)


def test_outside_image_is_rejected():
    vol, _ = _volume_with_blob(np.eye(4))
    with pytest.raises(FindingOutsideImageError, match="outside image"):
        check_inside(vol, np.array([500.0, 0.0, 0.0]), "study x")
    check_inside(vol, np.array([0.0, 0.0, 0.0]), "study x")


def test_resample_keeps_physical_positions():
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = [-50.0, 20.0, 100.0]
    zz, yy, xx = np.meshgrid(np.arange(20), np.arange(40), np.arange(50), indexing="ij")
    world_x = (xx * 0.7 - 50.0).astype(np.float32)  # intensity = world x coordinate
    out = resample_to_shape(Volume(world_x, affine), (10, 20, 25))
    centres = out.voxel_to_world(
        np.stack(np.meshgrid(np.arange(25), np.arange(20), np.arange(10), indexing="ij"), -1).reshape(-1, 3)
    )
    got = out.array.transpose(2, 1, 0).reshape(-1)
    np.testing.assert_allclose(got, centres[:, 0], atol=1e-3)
    np.testing.assert_allclose(out.spacing, [1.4, 1.4, 5.0])


def test_window():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    np.testing.assert_allclose(window(hu, -1000, 400), [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(window(hu, -1000, 400, "zero_one"), [0, 0, 0.5, 1, 1])
