"""2D images in the module's Qt-free logic, on real MRML nodes (slicer-core).

Slicer loads a PNG as a volume of one slice: a grey PNG as a scalar volume, a colour one (the carotid
images are grey stored as RGB) as a vector volume, with the IJK-to-RAS matrix of ITK's identity LPS
geometry. slicer-core has no PNG reader, so the nodes are built here as Slicer's loader builds them.
A 2D model (carotid-us) takes them like volumes, colour as grey; a 3D model refuses them with the reason.
"""
import numpy as np
import pytest

from test_slicer_detection import assert_same_grid, jobs_dir, leftover_jobs, segment_array  # noqa: F401
from test_slicer_scene import add_volume, new_scene, node_ids, slicer  # noqa: F401

from SynomalyDetectionLib import MrmlBridge, SynomalyLogic, format_report
from synomaly.errors import InputError
from synomaly.files.volume_io import read_volume

SLICER_PNG_MATRIX = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK's identity (LPS) in RAS, as Slicer sets it


def grey_stored_as_rgb(shape=(72, 80), radius=15, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    grey = np.clip(70 + 20 * rng.standard_normal(shape), 0, 255)
    grey[(r > radius) & (r < radius + 4)] = 180
    grey[r <= radius] = 5
    grey = grey.astype(np.uint8)
    return np.stack([grey, grey, grey], axis=-1), r <= radius


def tiny_model(folder, preset):
    """An untrained, very small model in the real file format, of the given preset (in seconds)."""
    torch = pytest.importorskip("torch")
    from synomaly.files.model_file import save_model
    from synomaly.method.network import UNet, UNetConfig
    from synomaly.method.presets import PRESETS
    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.method.schedule import DiffusionSchedule

    p = PRESETS[preset]
    torch.manual_seed(0)
    network = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                              num_heads=1, image_size=32))
    preprocessing = PreprocessConfig(intensity=p.intensity, window=p.window, image_size=32,
                                     disc_margin_px=p.disc_margin_px, disc_margin_mm=p.disc_margin_mm)
    metadata = {"name": f"tiny-{preset}", "description": "untrained; for plumbing tests", "preset": preset,
                "preprocessing": preprocessing.to_dict(), "schedule": DiffusionSchedule(1000).to_dict(),
                "inference": {"max_stages": 1}, "threshold": 0.1}
    return save_model(folder / f"tiny-{preset}.safetensors", network, metadata)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {preset: tiny_model(folder, preset) for preset in ("carotid-us", "brain-flair")}


@pytest.fixture
def scene():
    return new_scene()


def colour_png_node(tmp_path, name="us"):
    """The node Slicer makes of a colour PNG, and the PNG file itself (the engine's view of it)."""
    import SimpleITK as sitk

    rgb, lumen = grey_stored_as_rgb()
    path = tmp_path / f"{name}.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    node = add_volume(rgb[None], SLICER_PNG_MATRIX, name=name, class_name="vtkMRMLVectorVolumeNode")
    mask = add_volume(lumen[None].astype(np.uint8), SLICER_PNG_MATRIX, name=f"{name} lumen",
                      class_name="vtkMRMLLabelMapVolumeNode")
    return node, mask, path


def test_colour_2d_image_is_taken_as_grey_by_a_2d_model(scene, tmp_path, models):
    node, mask, path = colour_png_node(tmp_path)
    assert MrmlBridge.is_2d(node) and node.GetImageData().GetNumberOfScalarComponents() == 3
    before = slicer.util.arrayFromVolume(node).copy()
    request = SynomalyLogic(user_models_dir=tmp_path).prepare_detection(node, mask, model=str(models["carotid-us"]))
    grey, geometry = read_volume(path)
    assert np.array_equal(request.volume, grey) and request.volume.dtype == np.uint8
    assert request.geometry == geometry, "the same geometry as the engine reads from the file"
    assert request.mask.shape == grey.shape and request.mask.sum() > 0
    assert np.array_equal(slicer.util.arrayFromVolume(node), before), "the input node is not modified"


def test_colour_image_with_transparent_pixels_is_refused_naming_it(scene, tmp_path, models):
    rgb, lumen = grey_stored_as_rgb()
    alpha = np.full(lumen.shape, 255, np.uint8)
    opaque = add_volume(np.concatenate([rgb, alpha[..., None]], axis=-1)[None], SLICER_PNG_MATRIX, name="opaque",
                        class_name="vtkMRMLVectorVolumeNode")
    assert np.array_equal(MrmlBridge.volume_to_array(opaque), rgb[None, ..., 0]), "an opaque alpha is dropped"
    alpha[:5] = 0
    node = add_volume(np.concatenate([rgb, alpha[..., None]], axis=-1)[None], SLICER_PNG_MATRIX, name="sector",
                      class_name="vtkMRMLVectorVolumeNode")
    mask = add_volume(lumen[None].astype(np.uint8), SLICER_PNG_MATRIX, name="lumen",
                      class_name="vtkMRMLLabelMapVolumeNode")
    before = node_ids(scene)
    with pytest.raises(InputError, match=f"The image 'sector': {5 * 80} of its 5760 pixels are transparent.*"
                                         "export it again without transparency"):
        SynomalyLogic(user_models_dir=tmp_path).prepare_detection(node, mask, model=str(models["carotid-us"]))
    assert node_ids(scene) == before


@pytest.mark.parametrize("colour", [True, False])
def test_2d_image_is_refused_by_a_3d_model_with_the_reason(scene, tmp_path, models, jobs_dir, colour):
    node, mask, _ = colour_png_node(tmp_path)
    if not colour:
        node = add_volume(slicer.util.arrayFromVolume(node)[..., 0].copy(), SLICER_PNG_MATRIX, name="grey")
    before = node_ids(scene)
    with pytest.raises(InputError, match="2D image .80 x 72 pixels.*brain-flair preset works on 3D volumes"):
        SynomalyLogic(user_models_dir=tmp_path).detect(node, mask, model=str(models["brain-flair"]))
    assert node_ids(scene) == before and not leftover_jobs(jobs_dir)


def test_volume_of_several_colour_slices_is_still_refused(scene, tmp_path, models):
    rgb, _ = grey_stored_as_rgb()
    node = add_volume(np.stack([rgb, rgb]), SLICER_PNG_MATRIX, name="cine", class_name="vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="3 components per voxel"):
        SynomalyLogic(user_models_dir=tmp_path).prepare_detection(node, model=str(models["carotid-us"]))


def test_2d_image_runs_like_a_volume_in_the_worker(scene, tmp_path, models, jobs_dir):
    node, mask, _ = colour_png_node(tmp_path)
    logic = SynomalyLogic(user_models_dir=tmp_path)
    outputs = logic.detect(node, mask, model=str(models["carotid-us"]), device="cpu")
    for output in (outputs.counterfactual, outputs.anomaly_map):
        assert_same_grid(output, node)
        assert slicer.util.arrayFromVolume(output).shape == (1, 72, 80)
    assert segment_array(outputs.segmentation, node).shape == (1, 72, 80)
    assert outputs.report["slices_processed"] == 1 and "anomalous_area_px" in outputs.report
    assert format_report(outputs.report).startswith("Anomalous area: ")
    assert not leftover_jobs(jobs_dir)


def test_carotid_model_without_lumen_mask_fails_with_the_engines_reason(scene, tmp_path, models, jobs_dir):
    node, _, _ = colour_png_node(tmp_path)
    with pytest.raises(InputError, match="lumen mask"):
        SynomalyLogic(user_models_dir=tmp_path).detect(node, model=str(models["carotid-us"]), device="cpu")
    assert not leftover_jobs(jobs_dir)


def test_the_panel_asks_a_carotid_model_for_the_lumen_mask_before_any_run(scene, tmp_path, models, jobs_dir):
    node, _, _ = colour_png_node(tmp_path)
    logic = SynomalyLogic(user_models_dir=tmp_path)
    blocker = logic.missing_mask(str(models["carotid-us"]), None)
    assert "lumen mask" in blocker and "the Mask" in blocker and "--mask" not in blocker
    assert logic.missing_mask(str(models["brain-flair"]), None) == ""
    with pytest.raises(InputError) as refused:
        logic.prepare_detection(node, None, str(models["carotid-us"]))
    assert str(refused.value) == blocker
    assert not leftover_jobs(jobs_dir), "refused before any worker starts"


def test_report_of_a_2d_image_gives_areas():
    report = {"anomalous_volume_ml": 0.2, "n_components": 2, "anomalous_area_px": 250, "pixel_spacing_known": False,
              "anomalous_area_mm2": None, "components": [{"voxels": 200, "volume_ml": 0.2}, {"voxels": 50}]}
    text = format_report(report)
    assert "Anomalous area: 250 pixels in 2 component(s)" in text and "#2: 50 pixels" in text
    report.update(pixel_spacing_known=True, anomalous_area_mm2=2.5)
    assert "Anomalous area: 2.5 mm^2" in format_report(report) and "#1: 2.0 mm^2" in format_report(report)


def test_carotid_training_from_loaded_images_takes_each_ones_lumen_segment(scene, tmp_path, jobs_dir):
    from test_slicer_scene import add_segmentation

    first, _, _ = colour_png_node(tmp_path, "us1")
    second, _, _ = colour_png_node(tmp_path, "us2")
    _, lumen = grey_stored_as_rgb()
    wall = np.zeros_like(lumen)
    wall[30:40, 10:20] = True
    add_segmentation(first, [("wall", wall[None]), ("Lumen", lumen[None])], "us1 segments")
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    with pytest.raises(InputError, match=r"No lumen mask for 1 of 2 volumes \('us2'\).*Segment the lumen"):
        logic.prepare_training([first, second], "site-us", preset="carotid-us")
    add_segmentation(second, [("Segment_1", lumen[None])], "us2 lumen")
    cases = logic.prepare_training([first, second], "site-us", preset="carotid-us").healthy
    assert [c.name for c in cases] == ["us1", "us2"]
    for case in cases:
        assert case.mask.shape == case.array.shape and np.array_equal(case.mask[0], lumen)
    assert not list(jobs_dir.iterdir())
