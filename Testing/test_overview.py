"""Overview PNG: what the CLI writes next to its outputs for a quick visual check."""
import os

import numpy as np
import pytest
from skimage.io import imread

from synomaly.errors import InputError, OutputError
from synomaly.overview import GAP, choose_slices, render_overview, render_overview_array
from synomaly.phantom import make_phantom

SHAPE = (12, 40, 48)
RED, GREEN = (255, 0, 0), (0, 255, 0)


@pytest.fixture(scope="module")
def case():
    phantom = make_phantom(shape=(16, 64, 64), seed=2)
    healthy = make_phantom(shape=(16, 64, 64), seed=2, lesion=False)
    anomaly = np.abs(phantom.volume - healthy.volume)
    return phantom, healthy.volume, anomaly


def _is(rgb, colour):
    return np.all(rgb == np.asarray(colour, dtype=np.uint8), axis=-1)


def _box_case():
    volume = np.zeros(SHAPE, dtype=np.float32)
    volume[:, 5:35, 6:42] = 100.0
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[3:9, 12:24, 14:30] = 1
    return volume, seg


def test_writes_png_of_expected_size_with_red_contour(tmp_path, case):
    phantom, counterfactual, anomaly = case
    path = tmp_path / "case_overview.png"
    render_overview(phantom.volume, counterfactual, anomaly, phantom.lesion_mask, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(str(path))
    h, w = phantom.volume.shape[1:]
    rows = len(choose_slices(phantom.volume, phantom.lesion_mask, 3))
    assert rows == 3
    assert image.shape == (3 * h + 2 * GAP, 4 * w + 3 * GAP, 3)
    assert image.dtype == np.uint8
    # Red contour only in the fourth column, and the anomaly map column is not blank.
    contour_panel = image[:h, 3 * (w + GAP):]
    assert _is(contour_panel, RED).sum() > 5
    assert not _is(image[:, :3 * (w + GAP) - GAP], RED).any()
    assert image[:h, 2 * (w + GAP):3 * (w + GAP) - GAP].max() > 200
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_contours_follow_segmentation_and_ground_truth():
    volume, seg = _box_case()
    gt = np.zeros_like(seg)
    gt[3:9, 26:34, 8:20] = 1
    image = render_overview_array(volume, volume, seg.astype(float), seg, ground_truth=gt, n_slices=2)
    h, w = SHAPE[1:]
    for row in range(2):
        panel = image[row * (h + GAP):row * (h + GAP) + h, 3 * (w + GAP):]
        red, green = _is(panel, RED), _is(panel, GREEN)
        ys, xs = np.nonzero(red)
        # The red contour is the inner boundary of the segmented box.
        assert (ys.min(), ys.max(), xs.min(), xs.max()) == (12, 23, 14, 29)
        assert red[12, 14:30].all() and not red[17, 20]
        gy, gx = np.nonzero(green)
        assert (gy.min(), gy.max(), gx.min(), gx.max()) == (26, 33, 8, 19)
        # Inside the box, the grey input shows through.
        assert len(set(panel[17, 20])) == 1


def test_slices_spread_over_segmentation_or_foreground():
    volume, seg = _box_case()
    assert choose_slices(volume, seg, 3) == [4, 6, 7]
    assert all(seg[z].any() for z in choose_slices(volume, seg, 5))
    assert len(choose_slices(volume, seg, 50)) == 6
    empty = np.zeros_like(seg)
    volume[:2] = 0
    picked = choose_slices(volume, empty, 3)
    assert len(picked) == 3 and min(picked) >= 2
    assert choose_slices(np.zeros(SHAPE), empty, 1) == [6]


def test_anomaly_map_colour_scale():
    volume, seg = _box_case()
    anomaly = np.zeros(SHAPE, dtype=np.float32)
    anomaly[:, 10:20, 10:20] = 1.0
    anomaly[:, 25:30, 10:20] = 0.25
    h, w = SHAPE[1:]
    full = render_overview_array(volume, volume, anomaly, seg, n_slices=1)
    panel = full[:h, 2 * (w + GAP):3 * (w + GAP) - GAP]
    assert tuple(panel[15, 15]) == (255, 255, 255)
    assert tuple(panel[2, 2]) == (0, 0, 0)
    assert panel[27, 15, 0] > 0 and panel[27, 15, 2] == 0
    halved = render_overview_array(volume, volume, anomaly, seg, n_slices=1, map_max=2.0)
    panel = halved[:h, 2 * (w + GAP):3 * (w + GAP) - GAP]
    assert tuple(panel[15, 15]) == (255, 128, 0)


def test_counterfactual_shares_the_input_window():
    volume, seg = _box_case()
    brighter = volume * 2
    image = render_overview_array(volume, brighter, np.zeros(SHAPE), seg, n_slices=1)
    h, w = SHAPE[1:]
    assert image[20, 20, 0] < 255
    assert image[20, (w + GAP) + 20, 0] == 255


def test_bad_inputs_raise_input_error(tmp_path):
    volume, seg = _box_case()
    with pytest.raises(InputError):
        render_overview(volume, volume[:-1], volume, seg, tmp_path / "x.png")
    with pytest.raises(InputError):
        render_overview(volume[0], volume[0], volume[0], seg[0], tmp_path / "x.png")
    with pytest.raises(InputError):
        render_overview(volume, volume, volume, seg, tmp_path / "x.png", n_slices=0)
    assert not list(tmp_path.iterdir())


def test_unwritable_destination_raises_output_error_and_leaves_nothing(tmp_path):
    volume, seg = _box_case()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    with pytest.raises(OutputError):
        render_overview(volume, volume, volume, seg, blocker / "overview.png")
    with pytest.raises(OutputError):
        render_overview(volume, volume, volume, seg, tmp_path / "missing" / "overview.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into read-only folders")
def test_read_only_folder_raises_output_error(tmp_path):
    volume, seg = _box_case()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError):
            render_overview(volume, volume, volume, seg, locked / "overview.png")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)
