import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from cohortcast.data.errors import FindingOutsideImageError
from cohortcast.data.transforms import (
    antialias_sigma,
    axis_weights,
    check_inside,
    nodule_crop,
    patch_3d,
    resample_to_shape,
    window,
)
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
    out = resample_to_shape(Volume(world_x, affine), (10, 20, 25), antialias=False)
    centres = out.voxel_to_world(
        np.stack(np.meshgrid(np.arange(25), np.arange(20), np.arange(10), indexing="ij"), -1).reshape(-1, 3)
    )
    got = out.array.transpose(2, 1, 0).reshape(-1)
    np.testing.assert_allclose(got, centres[:, 0], atol=1e-3)
    np.testing.assert_allclose(out.spacing, [1.4, 1.4, 5.0])
    # The prefilter keeps a linear ramp wherever its kernel stays inside the image (a
    # symmetric kernel averages a ramp to itself); at the outer voxels the edge is repeated.
    smooth = resample_to_shape(Volume(world_x, affine), (10, 20, 25)).array
    np.testing.assert_allclose(smooth[:, :, 1:-1], out.array[:, :, 1:-1], atol=1e-3)


def _old_resample(array: np.ndarray, shape) -> np.ndarray:
    """What ingestion did before anti-aliasing: trilinear at the new voxel centres."""
    axes = [(np.arange(n) + 0.5) * (o / n) - 0.5 for n, o in zip(shape, array.shape)]
    grid = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(array, grid, order=1, mode="nearest", prefilter=False)


def test_axis_weights_are_scipys_gaussian_then_linear_interpolation():
    v = np.random.default_rng(0).normal(size=37)
    coords = np.array([-0.3, 0.0, 2.5, 7.25, 17.9, 35.6, 36.0, 36.4])
    for sigma in (0.0, 0.5, 1.5, 3.5):
        filtered = ndimage.gaussian_filter1d(v, sigma, mode="nearest") if sigma else v
        expected = ndimage.map_coordinates(filtered, [coords], order=1, mode="nearest", prefilter=False)
        np.testing.assert_allclose(axis_weights(37, coords, sigma) @ v, expected, atol=1e-6)
    padded = axis_weights(37, np.array([-0.6, -0.4, 36.4, 36.6]), 1.0, pad=True)
    assert padded[[0, 3]].sum() == 0 and np.allclose(padded[[1, 2]].sum(axis=1), 1.0)


def test_without_antialias_the_old_trilinear_resampling_is_kept():
    array = np.random.default_rng(1).normal(size=(9, 20, 30)).astype(np.float32)
    new = resample_to_shape(Volume(array, np.eye(4)), (4, 7, 40), antialias=False).array
    np.testing.assert_allclose(new, _old_resample(array, (4, 7, 40)), atol=1e-5)


@pytest.mark.parametrize(
    "name, factor",
    [("checkerboard", 3), ("checkerboard", 4), ("stripes of period 4", 4)],
)
def test_high_frequencies_come_out_at_their_mean_not_aliased(name, factor):
    z, y, x = np.meshgrid(np.arange(24), np.arange(48), np.arange(48), indexing="ij")
    if name == "checkerboard":  # +-1 voxel by voxel: all Nyquist
        pattern = np.where((x + y + z) % 2 == 0, 1.0, -1.0)
    else:  # 1, -1, -1, 1 along x: a 4x shrink samples the same phase every time
        pattern = np.where(np.isin(x % 4, (0, 3)), 1.0, -1.0)
    pattern = pattern.astype(np.float32)
    shape = tuple(n // factor for n in pattern.shape)
    out = resample_to_shape(Volume(pattern, np.eye(4)), shape).array
    assert out.shape == shape and np.abs(out - pattern.mean()).max() < 0.1
    aliased = np.abs(_old_resample(pattern, shape) - pattern.mean()).max()
    if (name, factor) != ("checkerboard", 4):  # at 4x linear interpolation happens to average this one out
        assert aliased > 0.9  # the old resampling turned a zero-mean pattern into +-1


def test_smooth_images_are_unchanged_by_the_prefilter():
    z, y, x = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    smooth = (400 * np.sin(2 * np.pi * x / 48.0) * np.cos(2 * np.pi * y / 64.0) - 300 + 5 * z).astype(np.float32)
    volume = Volume(smooth, np.diag([0.7, 0.7, 2.0, 1.0]))
    filtered = resample_to_shape(volume, (8, 32, 32)).array
    plain = resample_to_shape(volume, (8, 32, 32), antialias=False).array
    inner = (slice(1, -1), slice(2, -2), slice(2, -2))  # away from the repeated edges
    assert np.abs(filtered[inner] - plain[inner]).max() < 0.01 * 400


def test_antialias_sigma_is_skimages_rule():
    assert [antialias_sigma(f) for f in (0.5, 1.0, 2.0, 4.0, 8.0)] == [0.0, 0.0, 0.5, 1.5, 3.5]


_sizes = st.integers(min_value=1, max_value=12)


@settings(max_examples=40, deadline=None, database=None)
@given(
    old=st.tuples(_sizes, _sizes, _sizes),
    new=st.tuples(_sizes, _sizes, _sizes),
    spacing=st.tuples(*[st.floats(0.3, 4.0)] * 3),
    angle=st.floats(-np.pi, np.pi),
    origin=st.tuples(*[st.floats(-200.0, 200.0)] * 3),
    value=st.floats(-2000.0, 3000.0),
    antialias=st.booleans(),
)
def test_resample_properties(old, new, spacing, angle, origin, value, antialias):
    """Any grid, any target shape: the output has that shape, covers the same physical
    box (same centre, same outer corners), and a constant image stays that constant."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(spacing)
    affine[:3, 3] = origin
    volume = Volume(np.full(old, value, np.float32), affine)
    out = resample_to_shape(volume, new, antialias=antialias)
    assert out.shape == new
    np.testing.assert_allclose(out.array, value, rtol=1e-5, atol=1e-3)

    def box(v):  # centre and the outer corners (voxel edges) in LPS mm
        n = np.array(v.shape[::-1], float)
        return v.voxel_to_world(np.stack([(n - 1) / 2, -0.5 * np.ones(3), n - 0.5]))

    np.testing.assert_allclose(box(out), box(volume), atol=1e-6)
    mask = resample_to_shape(Volume(np.ones(old, np.float32), affine), new, order=0, cval=0, antialias=antialias)
    assert (mask.array == 1).all() and np.allclose(mask.affine, out.affine)


def test_window():
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])
    np.testing.assert_allclose(window(hu, -1000, 400), [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(window(hu, -1000, 400, "zero_one"), [0, 0, 0.5, 1, 1])
