"""Inference options of the anomaly map: leaving out the foreground's rim, and scaling by the volume."""
import numpy as np
import pytest

from synomaly.inference.detection import DetectionSettings, detect
from synomaly.inference.postprocessing import inner_region, scale_by_volume
from synomaly.files.model_file import load_model
from synomaly.evaluation.phantom import make_phantom


def test_inner_region_keeps_what_lies_beyond_the_rim_in_millimetres():
    fg = np.zeros((12, 30, 30), dtype=bool)
    fg[1:11, 5:25, 5:25] = True
    inner = inner_region(fg, 3.0, (2.0, 1.0, 1.0))
    # In-plane: 3 voxels of 1 mm lie within 3 mm of the outside; across slices 2 mm apart, one slice.
    assert not inner[6, 15, 7] and inner[6, 15, 8]
    assert not inner[1, 15, 15] and inner[2, 15, 15]
    assert not (inner & ~fg).any()
    one_slice = inner_region(fg[5:6], 3.0, (2.0, 1.0, 1.0))  # a 2D image: rim in-plane only
    assert one_slice[0, 15, 8] and not one_slice[0, 15, 7]


@pytest.fixture(scope="module")
def maps():
    phantom = make_phantom(shape=(40, 96, 96), seed=4)
    model = load_model("demo-phantom")
    out = {}
    for name, change in (("plain", {}), ("rim", {"rim_mm": 4.0}), ("scaled", {"map_scale": "volume"})):
        model.metadata["inference"] = {**model.metadata["inference"], "rim_mm": 0.0, "map_scale": "none", **change}
        out[name] = detect(phantom.volume, phantom.geometry, model, settings=DetectionSettings(device="cpu"))
    model.metadata["inference"] = {**model.metadata["inference"], "map_scale": "none"}
    out["geometry"] = phantom.geometry
    for name, blur in (("unblurred", 0.0), ("blur3", 3.0)):
        out[name] = detect(phantom.volume, phantom.geometry, model,
                           settings=DetectionSettings(device="cpu", blur_mm=blur))
    return out


def test_blur_setting_overrides_the_models_blur(maps):
    """The map with blur_mm is the unblurred difference blurred by that sigma; the model's own blur is another."""
    from synomaly.inference.postprocessing import blur_map

    unblurred, blur3, plain = maps["unblurred"], maps["blur3"], maps["plain"]
    assert plain.report["settings"]["blur_mm"] != 3.0 and blur3.report["settings"]["blur_mm"] == 3.0
    prepared = unblurred.prepared
    fg = prepared.orientation.invert(prepared.foreground)
    spacing_zyx = maps["geometry"].spacing[::-1]  # of the input's array axes
    expected = blur_map(unblurred.anomaly_map, 3.0, spacing_zyx) * fg
    np.testing.assert_allclose(blur3.anomaly_map, expected, rtol=1e-4, atol=1e-6)
    assert unblurred.anomaly_map.max() > plain.anomaly_map.max() > blur3.anomaly_map.max()


def test_rim_option_zeroes_the_map_near_the_border_only(maps):
    plain, rim = maps["plain"], maps["rim"]
    prepared = plain.prepared
    fg = prepared.orientation.invert(prepared.foreground)
    inner = prepared.orientation.invert(inner_region(prepared.foreground, 4.0, prepared.spacing_zyx))
    assert (rim.anomaly_map[fg & ~inner] == 0).all()
    assert (plain.anomaly_map[fg & ~inner] > 0).any()
    np.testing.assert_array_equal(rim.anomaly_map[inner], plain.anomaly_map[inner])


def test_volume_scale_divides_by_the_typical_level(maps):
    plain, scaled = maps["plain"], maps["scaled"]
    prepared = plain.prepared
    processed = np.zeros(prepared.foreground.shape, dtype=bool)
    processed[prepared.slices] = True
    fg = prepared.orientation.invert(prepared.foreground & processed)  # the level of the slices analysed
    level = np.percentile(plain.anomaly_map[fg], 75)
    np.testing.assert_allclose(scaled.anomaly_map, plain.anomaly_map / level, rtol=1e-5, atol=1e-7)
    assert np.percentile(scaled.anomaly_map[fg], 75) == pytest.approx(1.0)


def test_volume_scale_works_in_place_and_returns_its_level():
    rng = np.random.default_rng(0)
    fg = np.zeros((6, 10, 10), dtype=bool)
    fg[1:5, 2:8, 2:8] = True
    anomaly_map = (rng.random(fg.shape) * fg).astype(np.float32)
    uncertainty = anomaly_map * 0.5
    original = anomaly_map.copy()
    level = scale_by_volume(anomaly_map, uncertainty, fg, [1, 2, 3])
    region = fg.copy()
    region[[0, 4, 5]] = False  # only the processed slices decide the level
    assert level == pytest.approx(float(np.percentile(original[region], 75)))
    np.testing.assert_allclose(anomaly_map, original / level, rtol=1e-6)
    np.testing.assert_allclose(uncertainty, original * 0.5 / level, rtol=1e-6)


def test_fine_map_joins_the_map_at_its_own_threshold():
    """With a fine map (issue 19: lesions the blur hides), the map is the larger of the blurred map and the
    finer one times its gain, each scaled by its own volume level: what the two maps computed alone give."""
    phantom = make_phantom(shape=(40, 96, 96), seed=4, lesion_radius_mm=3.0)
    model = load_model("demo-phantom")
    base = {**model.metadata["inference"], "map_scale": "volume", "rim_mm": 2.0}
    settings = DetectionSettings(device="cpu", maps_only=True)

    def run(**inference):
        model.metadata["inference"] = {**base, **inference}
        return detect(phantom.volume, phantom.geometry, model, settings=settings).anomaly_map

    coarse = run(blur_mm=3.5)
    fine = run(blur_mm=1.0)
    joined = run(blur_mm=3.5, fine_blur_mm=1.0, fine_gain=0.5)
    np.testing.assert_allclose(joined, np.maximum(coarse, 0.5 * fine), rtol=1e-5, atol=1e-6)
    assert (joined > coarse + 1e-3).any()  # the fine map adds where it is sharper
    assert np.array_equal(run(blur_mm=3.5, fine_blur_mm=1.0, fine_gain=0.0), coarse)  # a gain of 0: off


def test_a_negative_fine_gain_is_refused_by_name(tmp_path):
    from synomaly.errors import ModelFileError
    from synomaly.files.model_file import save_model

    model = load_model("demo-phantom")
    model.metadata["inference"] = {**model.metadata["inference"], "fine_gain": -1.0}
    path = save_model(tmp_path / "m.safetensors", model.network, model.metadata)
    with pytest.raises(ModelFileError, match=r"inference\.fine_gain"):
        load_model(path)
