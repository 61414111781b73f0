"""Post-processing: the boxed blur equals a whole-volume blur; one labelling gives segmentation and components."""
import numpy as np
import pytest
from scipy import ndimage

from synomaly.inference.postprocessing import blur_map, segment


def sparse_map(shape=(30, 40, 50), seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.float32)
    out[8:14, 10:25, 12:20] = rng.random((6, 15, 8), dtype=np.float32)
    out[20, 30, 40] = 2.0
    return out


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 0.7)])
def test_boxed_blur_equals_whole_volume_blur(spacing):
    arr = sparse_map()
    sigma = [1.5 / s for s in spacing]
    expected = ndimage.gaussian_filter(arr, sigma=sigma, mode="nearest")
    got = blur_map(arr, 1.5, spacing)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_blur_touching_the_border_equals_whole_volume_blur():
    arr = np.zeros((20, 20, 20), dtype=np.float32)
    arr[0:3, 0:4, 17:20] = 1.0  # "nearest" at the volume's own border must be kept
    np.testing.assert_allclose(blur_map(arr, 2.0, (1, 1, 1)),
                               ndimage.gaussian_filter(arr, sigma=2.0, mode="nearest"), atol=1e-6)


def test_blur_of_an_empty_map_is_zero_and_input_is_untouched():
    arr = np.zeros((5, 6, 7), dtype=np.float32)
    assert not blur_map(arr, 1.5, (1, 1, 1)).any()
    arr = sparse_map()
    copy = arr.copy()
    blur_map(arr, 1.5, (1, 1, 1))
    np.testing.assert_array_equal(arr, copy)


def test_segment_drops_small_components_and_reports_the_rest():
    score = np.zeros((20, 30, 40), dtype=np.float32)
    score[2:6, 3:8, 4:10] = 0.5      # 4*5*6 = 120 voxels
    score[3, 4, 6] = 0.9             # its peak
    score[15, 20, 30] = 0.8          # one voxel: below the minimum size
    score[10:12, 25:27, 35:37] = 0.3  # 8 voxels, kept at 2 mm^3 per voxel (16 mm^3)
    seg, comps = segment(score, 0.2, min_component_mm3=10.0, voxel_volume_mm3=2.0)
    assert seg.dtype == np.uint8
    assert seg.sum() == 128 and seg[15, 20, 30] == 0
    assert [c["voxels"] for c in comps] == [120, 8]
    assert comps[0]["max_score"] == pytest.approx(0.9)
    assert comps[0]["volume_ml"] == pytest.approx(120 * 2.0 / 1000)
    # centre in voxel indices (i, j, k) = (x, y, z)
    assert comps[0]["centre_ijk"] == [6.5, 5.0, 3.5]
    assert comps[1]["centre_ijk"] == [35.5, 25.5, 10.5]


def test_segment_with_nothing_above_threshold():
    seg, comps = segment(np.zeros((4, 5, 6), dtype=np.float32), 0.1, 10.0, 1.0)
    assert seg.shape == (4, 5, 6) and not seg.any() and comps == []


def test_diagonal_neighbours_are_one_component():
    score = np.zeros((5, 5, 5), dtype=np.float32)
    score[1, 1, 1] = score[2, 2, 2] = score[3, 3, 3] = 1.0
    seg, comps = segment(score, 0.5, 0.0, 1.0)
    assert len(comps) == 1 and comps[0]["voxels"] == 3


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 0.7)])
def test_blur_on_a_torch_device_is_scipys_filter(spacing):
    """Detection on a GPU blurs with matrix products on the device; here on the CPU's torch, same code."""
    torch = pytest.importorskip("torch")
    arr = sparse_map()
    arr[0, 0:3, 45:50] = 1.0  # touches the border: "nearest" edges in the matrices too
    expected = blur_map(arr, 1.5, spacing)
    got = blur_map(arr, 1.5, spacing, torch.device("cpu"))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
