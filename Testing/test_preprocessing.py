"""Geometry round trips, reorientation, normalisation of raw and z-scored data, slice framing."""
import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.errors import InputError
from synomaly.evaluation.phantom import make_phantom
from synomaly.files.geometry import Orientation
from synomaly.inference.preprocessing import PreprocessConfig, check_volume, foreground_mask, prepare_volume
from synomaly.files.geometry import Geometry
from synomaly.files.volume_io import read_volume, write_volume


def _oblique_direction(deg=20.0):
    a = np.deg2rad(deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return tuple((rz @ rx).ravel())


def test_ijk_to_ras_matches_simpleitk_and_round_trips():
    geometry = Geometry((0.7, 1.3, 3.0), (10.0, -20.0, 5.5), _oblique_direction())
    image = sitk.Image(5, 6, 7, sitk.sitkFloat32)
    geometry.apply_to_sitk(image)
    m = geometry.ijk_to_ras()
    for ijk in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = m @ np.array([*ijk, 1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    again = Geometry.from_ijk_to_ras(m)
    assert np.allclose(again.spacing, geometry.spacing) and np.allclose(again.origin, geometry.origin)
    assert np.allclose(again.direction, geometry.direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_round_trip_keeps_oblique_anisotropic_geometry(tmp_path, suffix):
    array = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    geometry = Geometry((0.7, 1.3, 3.0), (10.0, -20.0, 5.5), _oblique_direction())
    path = tmp_path / f"v{suffix}"
    write_volume(path, array, geometry)
    back, g2 = read_volume(path)
    assert np.array_equal(back, array)
    assert np.allclose(g2.spacing, geometry.spacing, atol=1e-5)
    assert np.allclose(g2.origin, geometry.origin, atol=1e-4)
    assert np.allclose(g2.direction, geometry.direction, atol=1e-5)
    assert not list(tmp_path.glob(".tmp-*"))


def _sitk_lps(array, geometry):
    image = sitk.GetImageFromArray(array)
    geometry.apply_to_sitk(image)
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),           # RAS-stored
    (0, 0, 1, 1, 0, 0, 0, 1, 0),             # sagittal stack: k runs along x
    (0, 1, 0, 0, 0, -1, -1, 0, 0),           # coronal stack, flipped
])
def test_orientation_brings_axial_slices_to_axis0_like_simpleitk(direction):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    geometry = Geometry((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), tuple(float(d) for d in direction))
    orient = Orientation.for_geometry(geometry)
    assert np.array_equal(orient.apply(array), _sitk_lps(array, geometry))
    assert np.array_equal(orient.invert(orient.apply(array)), array)


def test_orientation_of_oblique_volume_is_invertible():
    array = np.random.default_rng(1).normal(size=(4, 5, 6))
    orient = Orientation.for_geometry(Geometry((1, 1, 1), (0, 0, 0), _oblique_direction(40)))
    assert np.array_equal(orient.invert(orient.apply(array)), array)


def test_normalisation_same_for_raw_and_zscored_input():
    """Real users bring raw integers with background 0; BraTS 2015 is z-scored with a constant
    negative background. The robust normalisation must give the same network input for both."""
    p = make_phantom(seed=3)
    raw = p.volume
    brain = raw > 0
    z = np.zeros(raw.shape, dtype=np.float32)
    z[brain] = (raw[brain] - raw[brain].mean()) / raw[brain].std()
    z[~brain] = z[brain].min() - 0.1  # a constant background below the brain, as in BraTS 2015
    config = PreprocessConfig()
    a = prepare_volume(raw, p.geometry, config)
    b = prepare_volume(z, p.geometry, config)
    assert np.array_equal(a.foreground, b.foreground)
    fg = a.foreground
    assert np.abs(a.normalised[fg] - b.normalised[fg]).max() < 0.02
    assert a.normalised.min() == -1.0 and a.normalised.max() <= 1.0
    healthy = fg & ~(p.lesion_mask > 0)
    assert -0.7 < np.median(a.normalised[healthy]) < 0.0
    assert a.normalised[p.lesion_mask > 0].mean() > np.percentile(a.normalised[healthy], 99)


def test_window_mode_maps_ct_window_linearly():
    config = PreprocessConfig(intensity="window", window=(0.0, 150.0))
    ct = np.full((4, 32, 32), -1000.0, dtype=np.float32)
    ct[:, 8:24, 8:24] = 75.0
    ct[:, 12:14, 12:14] = 300.0
    ct[:, 20, 20] = 37.5 + np.arange(4)
    prep = prepare_volume(ct, Geometry.identity(), config)
    assert np.allclose(prep.normalised[:, 10, 10], 0.0) and np.allclose(prep.normalised[:, 12, 12], 1.0)
    assert np.allclose(prep.normalised[:, 20, 20], (37.5 + np.arange(4)) / 75.0 - 1.0)
    assert prep.intensity.inverse(np.array([0.0]))[0] == pytest.approx(75.0)


def test_foreground_found_without_labels_for_noisy_background():
    p = make_phantom(seed=1)
    noisy = p.volume + np.random.default_rng(0).normal(5, 2, p.volume.shape).astype(np.float32)
    fg = foreground_mask(noisy)
    brain = p.brain_mask > 0
    assert (fg & brain).sum() / brain.sum() > 0.97
    assert (fg & ~brain).sum() / brain.sum() < 0.05


def test_slice_frame_keeps_aspect_ratio_and_round_trips():
    array = np.zeros((3, 100, 60), dtype=np.float32)
    yy, xx = np.mgrid[:100, :60]
    array[:] = np.sin(yy / 15.0) + np.cos(xx / 11.0) + 5
    geometry = Geometry((2.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # x spacing 2 mm
    prep = prepare_volume(array, geometry, PreprocessConfig(image_size=64, margin_mm=0))
    ry, rx = prep.frame.resized
    assert rx == 64 and ry == round(64 * 100 / 120)  # 100 mm tall, 120 mm wide: width is the long side
    images, masks = prep.network_slices()
    assert images.shape == (3, 1, 64, 64) and masks.any()
    back = prep.frame.from_network(images, array.shape[1:], -1.0)
    inner = prep.normalised[:, 5:-5, 5:-5]
    assert np.abs(back[:, 5:-5, 5:-5] - inner).max() < 0.1


@pytest.mark.parametrize("array,message", [
    (np.zeros((4, 4)), "2D"),
    (np.zeros((0, 20, 20), dtype=np.float32), "empty"),
    (np.ones((4, 20, 20), dtype=np.float32), "constant"),
    (np.where(np.eye(20)[None] > 0, np.nan, 1.0).repeat(3, 0), "NaN"),
    (np.random.default_rng(0).integers(0, 3, (4, 20, 20)).astype(np.float32), "label map"),
    (np.random.default_rng(0).normal(size=(4, 8, 8)), "too small"),
])
def test_bad_volumes_are_rejected_with_a_clear_message(array, message):
    with pytest.raises(InputError, match=message):
        check_volume(array)


def _zscored(p):
    """The phantom as BraTS 2015 stores it: z-scored brain, constant background just below it."""
    brain = p.brain_mask > 0
    z = np.zeros(p.volume.shape, dtype=np.float32)
    z[brain] = (p.volume[brain] - p.volume[brain].mean()) / p.volume[brain].std()
    z[~brain] = z[brain].min() - 0.1
    return z


def _assert_outlier_changes_nothing(clean, geometry, where, value):
    """One extreme voxel moves the foreground by at most that voxel and no other normalised intensity."""
    dirty = clean.copy()
    dirty[where] = value
    config = PreprocessConfig()
    a, b = prepare_volume(clean, geometry, config), prepare_volume(dirty, geometry, config)
    assert np.count_nonzero(a.foreground != b.foreground) <= 1
    assert (a.frame.y0, a.frame.y1, a.frame.x0, a.frame.x1) == (b.frame.y0, b.frame.y1, b.frame.x0, b.frame.x1)
    assert a.slices == b.slices
    others = np.ones(clean.shape, dtype=bool)
    others[where] = False
    others = a.orientation.apply(others)
    assert np.abs(a.normalised[others] - b.normalised[others]).max() < 2e-3


@pytest.mark.parametrize("kind,value", [("zscored", -1000.0), ("raw", -32768.0), ("raw", 32767.0)])
@pytest.mark.parametrize("inside", [True, False])
def test_one_outlier_voxel_changes_neither_foreground_nor_normalisation_on_a_phantom(kind, value, inside):
    p = make_phantom(seed=3)
    clean = _zscored(p) if kind == "zscored" else p.volume
    brain = np.argwhere(p.brain_mask > 0)
    where = tuple(brain[len(brain) // 2]) if inside else (16, 2, 3)
    _assert_outlier_changes_nothing(clean, p.geometry, where, value)


@pytest.mark.parametrize("case,value", [("brats2015/pat0001", -1000.0), ("brats2018/Brats18_CBICA_ARW_1", -32768.0)])
def test_one_outlier_voxel_changes_nothing_on_a_real_brats_case(shared_data, case, value):
    path = shared_data / case / "flair.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not found; CI provides it")
    volume, geometry = read_volume(path)
    brain = np.argwhere(volume > np.percentile(volume, 99))
    _assert_outlier_changes_nothing(volume, geometry, tuple(brain[len(brain) // 2]), value)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_intensity_forward_is_the_clipped_linear_map_and_leaves_the_input(dtype):
    from synomaly.inference.preprocessing import Intensity

    x = (np.arange(-50, 350, dtype=np.float64).reshape(4, 10, 10) * 3.5).astype(dtype)
    before = x.copy()
    intensity = Intensity(low=12.5, scale=700.0)
    y = intensity.forward(x)
    assert y.dtype == np.float32 and np.array_equal(x, before)
    expected = np.clip(2.0 * (x.astype(np.float32) - 12.5) / 700.0 - 1.0, -1.0, 1.0)
    np.testing.assert_array_equal(y, expected)


def test_holes_filled_in_each_slice_box_equal_the_whole_slice_fill():
    from scipy import ndimage

    from synomaly.inference.preprocessing import fill_holes_per_slice

    rng = np.random.default_rng(5)
    mask = ndimage.binary_opening(rng.random((12, 40, 50)) > 0.55)
    mask[3] = False                      # an empty slice
    mask[4, :, :] = False
    mask[4, 0:10, 0:12] = True           # a shape against the corner, with a hole
    mask[4, 4:6, 4:6] = False
    mask[5, :, :] = True                 # a full slice
    expected = np.stack([ndimage.binary_fill_holes(m) for m in mask])
    assert np.array_equal(fill_holes_per_slice(mask.copy()), expected)


@pytest.mark.parametrize("kind", ["constant", "noisy", "nan-free ties"])
def test_background_level_shortcut_equals_the_partition(kind):
    from synomaly.files.volume_io import background_level

    rng = np.random.default_rng(1)
    x = rng.normal(100.0, 20.0, size=(30, 60, 60)).astype(np.float32)
    if kind == "constant":
        x[:, :, :20] = -3.5              # a third of the voxels: the constant background
    elif kind == "nan-free ties":
        x[0, 0, :5] = x.min() - 1.0      # a few ties at the minimum, under 1 %
    sample = x.ravel()[:: max(1, x.size // 1_000_000)]
    k = int(0.01 * (sample.size - 1))
    assert background_level(x) == float(np.partition(sample, k)[k])


def test_context_slices_stack_each_slice_between_its_neighbours_repeating_the_ends():
    import torch

    volume = np.zeros((6, 40, 40), np.float32)
    volume[:, 8:32, 8:32] = np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1) * 10  # slice z holds 10 (z + 1)
    volume += np.random.default_rng(0).random(volume.shape).astype(np.float32)  # an image, not a label map
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    plain = prepare_volume(volume, geometry, PreprocessConfig(image_size=16, min_foreground_fraction=0.0))
    context = prepare_volume(volume, geometry, PreprocessConfig(image_size=16, min_foreground_fraction=0.0,
                                                                context_slices=1))
    images, masks = context.network_slices([0, 3, 5])
    alone, alone_masks = plain.network_slices([0, 3, 5])
    assert images.shape == (3, 3, 16, 16) and masks.shape == (3, 1, 16, 16)
    assert torch.equal(images[:, 1:2], alone) and torch.equal(masks, alone_masks)
    assert torch.equal(images[:, 0], plain.network_slices([0, 2, 4])[0][:, 0])  # z - 1, the first slice repeated
    assert torch.equal(images[:, 2], plain.network_slices([1, 4, 5])[0][:, 0])  # z + 1, the last slice repeated
    assert len({float(v) for v in images[1, :, 8, 8]}) == 3
