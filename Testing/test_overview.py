"""Overview PNG: what the CLI writes next to its outputs for a quick visual check."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.io import imread

from synomaly.errors import InputError, OutputError
from synomaly.files.overview import COLUMNS, choose_slices, compose_overview, render_overview
from synomaly.evaluation.phantom import make_phantom
from synomaly.files.geometry import Geometry

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


def _crop(image, box):
    top, left, bottom, right = box
    return image[top:bottom, left:right]


def _box_case():
    volume = np.zeros(SHAPE, dtype=np.float32)
    volume[:, 5:35, 6:42] = 100.0
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[3:9, 12:24, 14:30] = 1
    return volume, seg


def _storages(array, spacing_xyz):
    """The same physical volume stored axially (LPS and RAS) and sagittally: (array, geometry) pairs."""
    sx, sy, sz = spacing_xyz
    lps = (array, Geometry(spacing_xyz, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    ras = (array[:, ::-1, ::-1].copy(), Geometry(spacing_xyz, (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    # Sagittal stack: i runs anterior->posterior, j superior->inferior, k (the slices) right->left.
    sagittal = (np.ascontiguousarray(np.transpose(array[::-1], (2, 0, 1))),
                Geometry((sy, sz, sx), (0.0, 0.0, 0.0), (0, 0, 1, 1, 0, 0, 0, -1, 0)))
    for stored, geometry in (ras, sagittal):  # the test's own premise, checked against ITK
        image = sitk.GetImageFromArray(stored)
        geometry.apply_to_sitk(image)
        assert np.array_equal(sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")), array)
    return {"axial": lps, "axial RAS": ras, "sagittal": sagittal}


def test_writes_png_with_labelled_columns_and_red_contour(tmp_path, case):
    phantom, counterfactual, anomaly = case
    path = tmp_path / "case_overview.png"
    overview = render_overview(phantom.volume, counterfactual, anomaly, phantom.lesion_mask, path,
                               geometry=phantom.geometry)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(str(path))
    assert np.array_equal(image, overview.image) and image.dtype == np.uint8
    assert len(overview.slices) == 3 == len({row for row, _ in overview.panels})
    # Red contour only in the contours column (the map's own ramp passes through red), and the map is not blank.
    for row in range(3):
        assert _is(_crop(image, overview.panels[(row, "contours")]), RED).sum() > 5
        for column in ("input", "counterfactual"):
            assert not _is(_crop(image, overview.panels[(row, column)]), RED).any()
    assert _crop(image, overview.panels[(0, "anomaly map")]).max() > 200
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_titles_markers_colour_bar_and_legend_are_drawn():
    volume, seg = _box_case()
    gt = np.roll(seg, 4, axis=2)
    overview = compose_overview(volume, volume, seg.astype(float), seg, ground_truth=gt, n_slices=2)
    image, labels = overview.image, overview.labels
    dark = lambda box: (_crop(image, box).max(axis=-1) < 128).sum()  # noqa: E731
    lefts = []
    for title in COLUMNS:
        assert dark(labels[title]) > 10, title
        panel = overview.panels[(0, title)]
        assert labels[title][2] <= panel[0]  # above its column
        assert panel[1] <= labels[title][1] and labels[title][3] <= panel[3]
        lefts.append(labels[title][1])
    assert lefts == sorted(lefts)
    # R on the image's left, L on its right: radiological display.
    all_panels = list(overview.panels.values())
    assert dark(labels["R"]) > 5 and dark(labels["L"]) > 5
    assert labels["R"][3] <= min(p[1] for p in all_panels) and labels["L"][1] >= max(p[3] for p in all_panels)
    # The colour bar runs from black to white under the map column; its end values are written.
    bar = _crop(image, labels["colour bar"])[5].astype(int)
    assert tuple(bar[0]) == (0, 0, 0) and tuple(bar[-1]) == (255, 255, 255)
    assert np.all(np.diff(bar.sum(axis=-1)) >= 0)
    map_panel = overview.panels[(1, "anomaly map")]
    assert labels["colour bar"][0] >= map_panel[2] and map_panel[1] <= labels["colour bar"][1]
    assert dark(labels["colour bar 0"]) > 3 and dark(labels["colour bar max"]) > 3
    # The legend says which contour is which.
    assert _is(_crop(image, labels["legend ours"]), RED).any()
    assert _is(_crop(image, labels["legend truth"]), GREEN).any()
    assert dark(labels["legend ours text"]) > 5 and dark(labels["legend truth text"]) > 5
    without_truth = compose_overview(volume, volume, seg.astype(float), seg, n_slices=1)
    assert "legend truth" not in without_truth.labels


def test_same_picture_whatever_the_storage_orientation(case):
    phantom, counterfactual, anomaly = case
    arrays = [phantom.volume, counterfactual, anomaly, phantom.lesion_mask]
    spacing = (0.9, 1.1, 2.0)
    pictures = {}
    for name in ("axial", "axial RAS", "sagittal"):
        stored = [_storages(a, spacing)[name] for a in arrays]
        geometry = stored[0][1]
        pictures[name] = compose_overview(*[s[0] for s in stored], ground_truth=stored[3][0],
                                          geometry=geometry).image
    assert np.array_equal(pictures["axial"], pictures["axial RAS"])
    assert np.array_equal(pictures["axial"], pictures["sagittal"])


def test_axial_slices_in_radiological_display_with_square_millimetres():
    """A mark at the patient's left-anterior shows at the image's right-top, in any storage."""
    volume = np.zeros((10, 40, 30), dtype=np.float32)
    volume[:, 2:38, 2:28] = 50.0
    volume[:, 4:10, 20:26] = 200.0  # anterior (low y in LPS) and left (high x in LPS)
    spacing = (2.0, 1.0, 3.0)       # 2 mm across, 1 mm front to back: 60 x 40 mm
    for name, (stored, geometry) in _storages(volume, spacing).items():
        overview = compose_overview(stored, stored, np.zeros(stored.shape), np.zeros(stored.shape, np.uint8),
                                    geometry=geometry, n_slices=1)
        top, left, bottom, right = overview.panels[(0, "input")]
        assert (right - left) / (bottom - top) == pytest.approx(60 / 40, rel=0.03), name
        panel = overview.image[top:bottom, left:right, 0].astype(int)
        ys, xs = np.nonzero(panel == panel.max())
        assert ys.mean() < 0.3 * panel.shape[0] and xs.mean() > 0.7 * panel.shape[1], name


def test_contours_follow_segmentation_and_ground_truth():
    volume, seg = _box_case()
    gt = np.zeros_like(seg)
    gt[3:9, 26:34, 8:20] = 1
    overview = compose_overview(volume, volume, seg.astype(float), seg, ground_truth=gt, n_slices=2)
    top, left, bottom, right = overview.panels[(0, "contours")]
    zoom = (right - left) / SHAPE[2]
    assert (bottom - top) / SHAPE[1] == pytest.approx(zoom, rel=0.01)
    for row in range(2):
        panel = _crop(overview.image, overview.panels[(row, "contours")])
        red, green = _is(panel, RED), _is(panel, GREEN)
        ys, xs = np.nonzero(red)
        # The red contour is the inner boundary of the segmented box, at display scale.
        expected = np.array([12, 24, 14, 30]) * zoom
        assert np.allclose([ys.min(), ys.max() + 1, xs.min(), xs.max() + 1], expected, atol=1.5)
        assert not red[int(18 * zoom), int(22 * zoom)]
        gy, gx = np.nonzero(green)
        assert np.allclose([gy.min(), gy.max() + 1, gx.min(), gx.max() + 1], np.array([26, 34, 8, 20]) * zoom,
                           atol=1.5)
        # Inside the box, the grey input shows through.
        assert len(set(panel[int(18 * zoom), int(22 * zoom)])) == 1


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
    # One extreme voxel in an empty slice does not make it foreground.
    volume[0, 0, 0] = -32768
    assert min(choose_slices(volume, empty, 3)) >= 2


def test_anomaly_map_colour_scale():
    volume, seg = _box_case()
    anomaly = np.zeros(SHAPE, dtype=np.float32)
    anomaly[:, 10:20, 10:20] = 1.0
    anomaly[:, 25:30, 10:20] = 0.25
    full = compose_overview(volume, volume, anomaly, seg, n_slices=1)
    top, left, bottom, right = full.panels[(0, "anomaly map")]
    zoom = (right - left) / SHAPE[2]
    panel = _crop(full.image, full.panels[(0, "anomaly map")])
    at = lambda y, x: tuple(panel[int(y * zoom), int(x * zoom)])  # noqa: E731
    assert at(15, 15) == (255, 255, 255)
    assert at(2, 2) == (0, 0, 0)
    assert at(27, 15)[0] > 0 and at(27, 15)[2] == 0
    halved = compose_overview(volume, volume, anomaly, seg, n_slices=1, map_max=2.0)
    panel = _crop(halved.image, halved.panels[(0, "anomaly map")])
    assert tuple(panel[int(15 * zoom), int(15 * zoom)]) == (255, 128, 0)
    assert halved.map_max == 2.0


def test_counterfactual_shares_the_input_window():
    volume, seg = _box_case()
    overview = compose_overview(volume, volume * 2, np.zeros(SHAPE), seg, n_slices=1)
    inp = _crop(overview.image, overview.panels[(0, "input")])
    cf = _crop(overview.image, overview.panels[(0, "counterfactual")])
    y, x = inp.shape[0] // 2, inp.shape[1] // 2
    assert inp[y, x, 0] < 255 and cf[y, x, 0] == 255


def test_bad_inputs_raise_input_error(tmp_path):
    volume, seg = _box_case()
    with pytest.raises(InputError):
        render_overview(volume, volume[:-1], volume, seg, tmp_path / "x.png")
    with pytest.raises(InputError):
        render_overview(volume[0], volume[0], volume[0], seg[0], tmp_path / "x.png")
    with pytest.raises(InputError):
        render_overview(volume, volume, volume, seg, tmp_path / "x.png", n_slices=0)
    with pytest.raises(InputError):
        compose_overview(volume, volume, volume, seg, slices=[SHAPE[0]])
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
