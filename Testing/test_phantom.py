"""Synthetic phantoms: the test and demo data every other test relies on."""
import time

import numpy as np
import pytest
from scipy import ndimage

from synomaly.errors import InputError
from synomaly.evaluation.phantom import Phantom, make_phantom, write_phantom_case
from synomaly.files.volume_io import read_volume

SMALL = (16, 64, 64)


@pytest.fixture(scope="module")
def lesion_phantom():
    return make_phantom(shape=SMALL, seed=3)


@pytest.fixture(scope="module")
def healthy_phantom():
    return make_phantom(shape=SMALL, seed=3, lesion=False)


def test_types_shapes_and_geometry(lesion_phantom):
    p = lesion_phantom
    assert isinstance(p, Phantom)
    assert p.volume.dtype == np.float32 and p.volume.shape == SMALL
    assert p.brain_mask.dtype == np.uint8 and p.lesion_mask.dtype == np.uint8
    assert p.brain_mask.shape == p.lesion_mask.shape == SMALL
    assert set(np.unique(p.brain_mask)) == {0, 1}
    assert p.geometry.spacing == (1.0, 1.0, 2.0)
    assert p.geometry.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(p.geometry.direction_matrix, np.eye(3))


def test_deterministic_per_seed_and_different_between_seeds(lesion_phantom):
    again = make_phantom(shape=SMALL, seed=3)
    np.testing.assert_array_equal(again.volume, lesion_phantom.volume)
    np.testing.assert_array_equal(again.lesion_mask, lesion_phantom.lesion_mask)
    other = make_phantom(shape=SMALL, seed=4)
    assert not np.array_equal(other.brain_mask, lesion_phantom.brain_mask)
    assert not np.array_equal(other.lesion_mask, lesion_phantom.lesion_mask)


def test_background_exactly_zero_and_brain_tissue_positive(lesion_phantom):
    p = lesion_phantom
    brain = p.brain_mask.astype(bool)
    assert np.all(p.volume[~brain] == 0)
    assert np.all(p.volume[brain] > 0)
    assert np.all(p.volume == np.rint(p.volume))
    assert 90 < np.median(p.volume[brain]) < 200
    # The brain sits inside the field of view, not touching its border.
    assert not brain[:, 0, :].any() and not brain[:, :, -1].any()
    assert 0.1 < brain.mean() < 0.5


def test_lesion_inside_brain_one_hemisphere_and_hyperintense(lesion_phantom):
    p = lesion_phantom
    brain, lesion = p.brain_mask.astype(bool), p.lesion_mask.astype(bool)
    assert lesion.sum() > 50
    assert np.all(brain[lesion])
    # Away from the border: a margin of brain all around it.
    assert np.all(brain[ndimage.binary_dilation(lesion, iterations=2)])
    _, n_parts = ndimage.label(lesion)
    assert n_parts == 1
    healthy = brain & ~ndimage.binary_dilation(lesion, iterations=2)
    assert p.volume[lesion].mean() > 1.25 * p.volume[healthy].mean()
    assert np.percentile(p.volume[lesion], 75) > np.percentile(p.volume[healthy], 99)


@pytest.mark.parametrize("seed", range(4))
def test_fair_to_methods_that_know_anatomy(seed):
    """Healthy structures as bright as a good part of the lesion (periventricular caps deep inside,
    cortex), and lesions of mixed intensity: no single intensity threshold separates the two."""
    p = make_phantom(seed=seed)
    brain, lesion = p.brain_mask.astype(bool), p.lesion_mask.astype(bool)
    healthy = brain & ~ndimage.binary_dilation(lesion, iterations=2)
    typical = np.median(p.volume[healthy])
    deep = ndimage.distance_transform_edt(brain, sampling=(2.0, 1.0, 1.0)) > 8.0  # far from the cortex
    assert np.count_nonzero(healthy & deep & (p.volume > 1.3 * typical)) > 50
    # Some of the lesion is no brighter than the brightest healthy percent, some far brighter.
    ceiling = np.percentile(p.volume[healthy], 99)
    assert 0.1 < np.mean(p.volume[lesion] <= ceiling) < 0.7
    assert np.percentile(p.volume[lesion], 95) > 1.5 * typical


def test_lesion_stays_in_one_hemisphere():
    for seed in range(4):
        p = make_phantom(shape=SMALL, seed=seed)
        z, y, x = np.nonzero(p.lesion_mask)
        brain_x = np.nonzero(p.brain_mask)[2]
        middle = 0.5 * (brain_x.min() + brain_x.max())
        # Allow the small in-plane rotation and shift of the head.
        assert np.mean(x < middle) > 0.9 or np.mean(x > middle) > 0.9


def test_healthy_phantom_is_the_lesion_phantom_without_lesion(lesion_phantom, healthy_phantom):
    h, p = healthy_phantom, lesion_phantom
    assert h.lesion_mask.sum() == 0
    np.testing.assert_array_equal(h.brain_mask, p.brain_mask)
    changed = h.volume != p.volume
    assert changed.any()
    # Only the lesion and its soft edge differ.
    assert not np.any(changed & ~ndimage.binary_dilation(p.lesion_mask, iterations=2))


def test_default_radius_and_explicit_radius():
    default = make_phantom(seed=1)
    assert default.volume.shape == (32, 96, 96)
    volume_mm3 = default.lesion_mask.sum() * default.geometry.voxel_volume_mm3
    radius = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    assert 3.0 < radius < 13.0
    small = make_phantom(seed=1, lesion_radius_mm=4.0).lesion_mask.sum()
    large = make_phantom(seed=1, lesion_radius_mm=9.0).lesion_mask.sum()
    assert large > 4 * small > 0


def test_fast_enough():
    make_phantom(seed=0)
    start = time.perf_counter()
    make_phantom(seed=5)
    # Spec: < 0.5 s; leave room for a shared, busy machine.
    assert time.perf_counter() - start < 1.5


def test_anisotropic_spacing_is_respected():
    p = make_phantom(shape=(24, 48, 48), seed=2, spacing=(2.0, 2.0, 1.0))
    assert p.geometry.spacing == (2.0, 2.0, 1.0)
    assert p.lesion_mask.sum() > 0


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError):
        make_phantom(shape=(4, 64, 64))
    with pytest.raises(InputError):
        make_phantom(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError):
        make_phantom(lesion_radius_mm=-1)


def test_write_phantom_case_round_trip(tmp_path):
    folder = tmp_path / "case" / "nested"
    paths = write_phantom_case(folder, seed=6, shape=SMALL)
    assert set(paths) == {"flair", "brainmask", "seg"}
    assert [p.name for p in (paths["flair"], paths["brainmask"], paths["seg"])] == \
        ["flair.nii.gz", "brainmask.nii.gz", "seg.nii.gz"]
    expected = make_phantom(shape=SMALL, seed=6)
    flair, geometry = read_volume(paths["flair"])
    np.testing.assert_allclose(geometry.spacing, (1.0, 1.0, 2.0))
    np.testing.assert_array_equal(flair, expected.volume)
    mask, _ = read_volume(paths["brainmask"])
    seg, seg_geometry = read_volume(paths["seg"])
    np.testing.assert_array_equal(mask, expected.brain_mask)
    np.testing.assert_array_equal(seg, expected.lesion_mask)
    np.testing.assert_allclose(seg_geometry.spacing, (1.0, 1.0, 2.0))
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_write_healthy_case_has_empty_seg(tmp_path):
    paths = write_phantom_case(tmp_path, seed=6, lesion=False, shape=SMALL, spacing=(0.9, 0.9, 3.0))
    seg, geometry = read_volume(paths["seg"])
    assert seg.sum() == 0
    np.testing.assert_allclose(geometry.spacing, (0.9, 0.9, 3.0))
