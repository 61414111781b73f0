"""Detection through the module's Qt-free logic on real MRML nodes (slicer-core).

What the module does with nodes is checked with results computed here from the prepared request (a
threshold stands in for the engine between ``prepare_detection`` and ``apply_detection``); the worker
process, its progress, cancel and errors are checked with the real engine (a tiny untrained model, or
the bundled demo model).
"""
import ctypes
import ctypes.util
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import vtk

from test_slicer_scene import add_volume, new_scene, node_ids, oblique_matrix, slicer  # noqa: F401

from SynomalyDetectionLib import MrmlBridge, Parameters, SynomalyLogic, format_report, panel_wording
from SynomalyDetectionLib.Engine import Engine
from SynomalyDetectionLib.JobRunner import CANCELLED, FAILED, SUCCEEDED, WorkerError, WorkerJob, process_gone
from synomaly.inference.detection import DetectionResult
from synomaly.errors import Cancelled, DeviceError, InputError, ModelFileError, SynomalyError
from synomaly.evaluation.phantom import make_phantom

SHAPE = (12, 48, 48)
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="process groups and /proc are POSIX")


class StandInModels(Engine):
    """The real engine's light calls, with one bundled model named 'threshold'."""

    def list_models(self, extra_dirs=()):
        from synomaly.files.model_file import ModelInfo

        infos = [ModelInfo("threshold", Path("/bundled/threshold.safetensors"), "test stand-in")]
        for folder in extra_dirs:
            infos += [ModelInfo(p.stem, p, "user") for p in sorted(Path(folder).glob("*.safetensors"))]
        return infos

    def default_model(self):
        return "threshold"


def threshold_result(request, level=0.8, ensemble=False):
    """What a trivial detector would return for the request: voxels above ``level`` are anomalous."""
    volume = request.volume
    score = np.clip(volume.astype(np.float32), 0, None)
    if request.mask is not None:
        score = score * request.mask
    seg = (score > level).astype(np.uint8)
    report = {"anomalous_volume_ml": float(seg.sum() * request.geometry.voxel_volume_mm3 / 1000),
              "n_components": int(seg.any()), "components": [{"volume_ml": 0.1}], "max_score": float(score.max()),
              "mean_score": float(score.mean()), "threshold": level}
    return DetectionResult(score, seg, np.minimum(volume, level).astype(np.float32),
                           score * 0.1 if ensemble else None, report)


def run_here(logic, node, level=0.8, ensemble=False, **kwargs):
    """prepare -> (stand-in result) -> apply, in this process."""
    request = logic.prepare_detection(node, **kwargs)
    return logic.apply_detection(request, threshold_result(request, level, ensemble))


def lesion_volume(shape=SHAPE):
    volume = np.full(shape, 0.3, np.float32)
    volume[4:8, 20:30, 10:18] = 1.0
    return volume


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture(autouse=True)
def jobs_dir(tmp_path, monkeypatch):
    """Job folders go here, so that a test can see that none is left behind."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def leftover_jobs(jobs_dir):
    return sorted(p.name for p in jobs_dir.iterdir())


@pytest.fixture
def logic(tmp_path):
    return SynomalyLogic(engine=StandInModels(), user_models_dir=tmp_path / "models")


def assert_same_grid(node, reference):
    assert np.allclose(MrmlBridge.ijk_to_ras(node), MrmlBridge.ijk_to_ras(reference))
    assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()


def segment_array(segmentation_node, reference):
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    assert segment_id
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference)


def check_outputs(outputs, volume_node, expected_segment):
    assert outputs.segmentation.GetName() == f"{volume_node.GetName()} anomalies"
    assert outputs.counterfactual.GetName() == f"{volume_node.GetName()} counterfactual"
    assert outputs.anomaly_map.GetName() == f"{volume_node.GetName()} anomaly map"
    assert outputs.input_node is volume_node
    for node in (outputs.counterfactual, outputs.anomaly_map):
        assert_same_grid(node, volume_node)
    geometry_ref = outputs.segmentation.GetNodeReference(
        slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    assert geometry_ref is volume_node
    segment = segment_array(outputs.segmentation, volume_node)
    assert segment.shape == slicer.util.arrayFromVolume(volume_node).shape
    assert np.array_equal(segment > 0, expected_segment > 0)
    sh = MrmlBridge.subject_hierarchy(volume_node.GetScene())
    parent = sh.GetItemParent(sh.GetItemByDataNode(volume_node))
    for node in outputs.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == parent


def names_in(scene):
    return [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())]


# what the module does with nodes: prepare and apply, in this process


def test_outputs_are_three_aligned_nodes_beside_the_input(scene, logic):
    sh = MrmlBridge.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    volume = lesion_volume()
    node = add_volume(volume, oblique_matrix(), name="flair")
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(0.9, 0.45)
    sh.CreateItem(study, node)
    before = slicer.util.arrayFromVolume(node).copy()

    request = logic.prepare_detection(node, threshold=0.5)
    assert request.settings["threshold"] == 0.5 and request.model == "threshold"
    assert np.allclose(request.geometry.ijk_to_ras(), oblique_matrix())
    request.volume[...] = 0  # a careless engine: the input node must not notice, since it gets a copy
    request.volume[...] = volume
    outputs = logic.apply_detection(request, threshold_result(request))

    check_outputs(outputs, node, volume > 0.8)
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    assert np.allclose(slicer.util.arrayFromVolume(outputs.counterfactual), np.minimum(volume, 0.8))
    counterfactual_display = outputs.counterfactual.GetDisplayNode()
    assert (counterfactual_display.GetWindow(), counterfactual_display.GetLevel()) == pytest.approx((0.9, 0.45))
    assert outputs.anomaly_map.GetDisplayNode().GetColorNodeID() == MrmlBridge.ANOMALY_MAP_COLOR_NODE_ID
    assert outputs.report["n_components"] == 1 and outputs.uncertainty is None


def test_anomaly_map_overlay_colours_only_high_scores(scene, logic):
    """The heat map over the input: with no threshold, every voxel (score 0 included) was painted."""
    node = add_volume(lesion_volume(), name="flair")
    outputs = run_here(logic, node, level=0.8)
    display = outputs.anomaly_map.GetDisplayNode()
    assert display.GetApplyThreshold()
    assert 0 < display.GetLowerThreshold() <= 0.8
    assert display.GetUpperThreshold() >= slicer.util.arrayFromVolume(outputs.anomaly_map).max()


def test_outputs_follow_the_input_transform(scene, logic):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node = add_volume(lesion_volume(), oblique_matrix(), name="moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    outputs = run_here(logic, node, ensemble=True)
    assert all(n.GetTransformNodeID() == transform.GetID() for n in outputs.nodes())


def test_mask_from_segmentation_and_label_map_reaches_the_request(scene, logic):
    volume = lesion_volume()
    node = add_volume(volume, oblique_matrix(), name="flair")
    region = np.zeros(SHAPE, np.uint8)
    region[:, :26, :] = 1
    label = add_volume(region, oblique_matrix(), name="half", class_name="vtkMRMLLabelMapVolumeNode")
    request = logic.prepare_detection(node, maskNode=label)
    assert np.array_equal(request.mask, region > 0)
    outputs = logic.apply_detection(request, threshold_result(request))
    assert np.array_equal(segment_array(outputs.segmentation, node) > 0, (volume > 0.8) & (region > 0))

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("brain")
    slicer.util.updateSegmentBinaryLabelmapFromArray(region, segmentation, segment_id, node)
    assert np.array_equal(logic.prepare_detection(node, maskNode=segmentation).mask, region > 0)


def test_label_map_mask_on_another_grid_is_resampled(scene, logic):
    node = add_volume(lesion_volume(), np.diag([1.0, 1.0, 2.0, 1.0]), name="flair")
    coarse = np.ones((6, 24, 24), np.uint8)
    label = add_volume(coarse, np.diag([2.0, 2.0, 4.0, 1.0]), name="coarse", class_name="vtkMRMLLabelMapVolumeNode")
    mask = logic.prepare_detection(node, maskNode=label).mask
    assert mask.shape == SHAPE and mask[1:-1, 1:-1, 1:-1].all()


def shifted_region():
    region = np.zeros(SHAPE, np.uint8)
    region[:, :, 10:20] = 1
    expected = np.zeros(SHAPE, bool)
    expected[:, :, 15:25] = True  # 5 mm to the right: 5 voxels along i (R) on an identity grid
    return region, expected


@pytest.mark.parametrize("kind", ["label map", "segmentation"])
def test_mask_under_another_transform_is_taken_where_it_is_shown(scene, logic, kind):
    """A mask moved by a transform covers, on the input's grid, where Slicer shows it."""
    node = add_volume(lesion_volume(), name="flair")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)
    shift.SetMatrixTransformToParent(matrix)
    region, expected = shifted_region()
    if kind == "label map":
        mask = add_volume(region, name="moved labels", class_name="vtkMRMLLabelMapVolumeNode")
    else:
        reference = add_volume(np.zeros(SHAPE, np.float32), name="grid")
        mask = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moved segments")
        mask.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segment_id = mask.GetSegmentation().AddEmptySegment("region")
        slicer.util.updateSegmentBinaryLabelmapFromArray(region, mask, segment_id, reference)
    mask.SetAndObserveTransformNodeID(shift.GetID())
    assert np.array_equal(logic.prepare_detection(node, maskNode=mask).mask, expected)

    node.SetAndObserveTransformNodeID(shift.GetID())  # both moved alike: no shift between them
    assert np.array_equal(logic.prepare_detection(node, maskNode=mask).mask, region > 0)


def test_resampled_label_map_releases_its_image(scene, logic, monkeypatch):
    """CreateOrientedImageDataFromVolumeNode hands over a reference: keeping it leaked every mask image."""
    created = []
    real = slicer.vtkSlicerSegmentationsModuleLogic

    class Spy(real):
        @staticmethod
        def CreateOrientedImageDataFromVolumeNode(*args):
            image = real.CreateOrientedImageDataFromVolumeNode(*args)
            created.append(image)
            return image

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", Spy)
    node = add_volume(lesion_volume(), np.diag([1.0, 1.0, 2.0, 1.0]), name="flair")
    label = add_volume(np.ones((6, 24, 24), np.uint8), np.diag([2.0, 2.0, 4.0, 1.0]), name="coarse",
                       class_name="vtkMRMLLabelMapVolumeNode")
    logic.prepare_detection(node, maskNode=label)
    assert len(created) == 1
    assert created[0].GetReferenceCount() == 1, "only this test's Python reference may be left"


def test_rerun_updates_or_adds_outputs(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    first = run_here(logic, node)
    count = scene.GetNumberOfNodes()
    again = run_here(logic, node, outputs=first)
    assert [n.GetID() for n in again.nodes()] == [n.GetID() for n in first.nodes()]
    assert scene.GetNumberOfNodes() == count
    fresh = run_here(logic, node)
    assert not {n.GetID() for n in fresh.nodes()} & {n.GetID() for n in first.nodes()}
    assert fresh.segmentation.GetName() != first.segmentation.GetName()


def test_reused_outputs_never_share_a_name_with_other_nodes(scene, logic):
    """Updating the second run's outputs renamed them to the first run's names."""
    node = add_volume(lesion_volume(), name="flair")
    run_here(logic, node)
    second = run_here(logic, node)
    run_here(logic, node, outputs=second)
    names = names_in(scene)
    assert len(names) == len(set(names)), sorted(names)
    node.SetName("flair-renamed")
    run_here(logic, node, outputs=second)
    assert second.segmentation.GetName() == "flair-renamed anomalies"
    names = names_in(scene)
    assert len(names) == len(set(names)), sorted(names)


def test_ensemble_uncertainty_becomes_a_volume_node(scene, logic):
    node = add_volume(lesion_volume(), oblique_matrix(), name="flair")
    logic.save_parameters(Parameters(input_volume=node, update_outputs=True, ensemble=3))
    request = logic.prepare_panel_detection(logic.parameters())
    outputs = logic.apply_detection(request, threshold_result(request, ensemble=True), remember=True)
    assert outputs.uncertainty.GetName() == "flair uncertainty"
    assert outputs.uncertainty.IsA("vtkMRMLScalarVolumeNode")
    assert_same_grid(outputs.uncertainty, node)
    assert np.allclose(slicer.util.arrayFromVolume(outputs.uncertainty), 0.1 * np.clip(lesion_volume(), 0, None))
    assert logic.parameters().uncertainty is outputs.uncertainty

    request = logic.prepare_panel_detection(logic.parameters())
    again = logic.apply_detection(request, threshold_result(request, ensemble=True), remember=True)
    assert again.uncertainty is outputs.uncertainty
    request = logic.prepare_panel_detection(logic.parameters())
    single = logic.apply_detection(request, threshold_result(request), remember=True)
    assert single.uncertainty is None and outputs.uncertainty.GetScene() is None, "a stale map is removed"
    assert single.segmentation is outputs.segmentation and logic.parameters().uncertainty is None


def test_side_by_side_view_shows_input_and_counterfactual_linked(scene, logic):
    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal")):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        views[name] = (slice_node, composite)
    node = add_volume(lesion_volume(), name="flair")
    outputs = run_here(logic, node)
    MrmlBridge.show_side_by_side(outputs)
    red, yellow = views["Red"][1], views["Yellow"][1]
    assert red.GetBackgroundVolumeID() == node.GetID()
    assert red.GetForegroundVolumeID() == outputs.anomaly_map.GetID() and red.GetForegroundOpacity() > 0
    assert yellow.GetBackgroundVolumeID() == outputs.counterfactual.GetID()
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    assert views["Yellow"][0].GetOrientationString() == "Axial"
    assert outputs.segmentation.GetDisplayNode().GetVisibility2D()


def test_panel_detection_remembers_and_reuses_outputs(scene, logic):
    node = add_volume(lesion_volume(), oblique_matrix(), name="flair")
    logic.save_parameters(Parameters(input_volume=node, model="threshold", update_outputs=True))
    request = logic.prepare_panel_detection(logic.parameters())
    outputs = logic.apply_detection(request, threshold_result(request), remember=True)
    stored = logic.parameters()
    assert stored.segmentation is outputs.segmentation and stored.anomaly_map is outputs.anomaly_map
    assert stored.report()["n_components"] == 1
    request = logic.prepare_panel_detection(logic.parameters())
    assert request.reuse.segmentation is outputs.segmentation
    stored.update_outputs = False
    assert logic.prepare_panel_detection(stored).reuse is None


def test_update_mode_never_overwrites_the_outputs_of_another_input(scene, logic):
    first = add_volume(lesion_volume(), name="first")
    second = add_volume(lesion_volume() * 0.5, name="second")
    logic.save_parameters(Parameters(input_volume=first, update_outputs=True))
    request = logic.prepare_panel_detection(logic.parameters())
    outputs_first = logic.apply_detection(request, threshold_result(request), remember=True)
    params = logic.parameters()
    params.input_volume = second
    request = logic.prepare_panel_detection(params)
    assert request.reuse is None
    outputs_second = logic.apply_detection(request, threshold_result(request), remember=True)
    assert outputs_first.segmentation.GetName() == "first anomalies"
    assert outputs_second.segmentation.GetName() == "second anomalies"


def test_report_is_summarised_for_the_panel():
    text = format_report({"anomalous_volume_ml": 12.345, "n_components": 2,
                          "components": [{"volume_ml": 10.0}, {"volume_ml": 2.345}], "max_score": 0.9,
                          "mean_score": 0.1, "threshold": 0.25, "threshold_source": "model calibration",
                          "model": {"name": "brain-flair", "model_id": "abc123"}})
    assert "12.35 mL in 2 component(s)" in text and "#2: 2.35 mL" in text
    assert "0.250 (model calibration)" in text and "brain-flair (abc123)" in text
    assert format_report(None) == ""


def test_the_panel_summary_gives_the_input_fit_and_warnings_first():
    text = format_report({"anomalous_volume_ml": 1.0, "n_components": 1, "components": [{"volume_ml": 1.0}],
                          "input_fit": {"score": 1.74, "verdict": "unusual"},
                          "warnings": ["input unlike the brain-flair model's calibration volumes (...)"]})
    lines = text.splitlines()
    assert lines[0].startswith("Warning: input unlike the brain-flair model's")
    assert "Input fit: unusual (score 1.7; 0: like the model's calibration volumes)" in lines


def test_a_fit_refusal_names_the_console_switch_in_slicer():
    from synomaly.errors import InputError
    from synomaly.inference.input_fit import check_fit, fit_score, reference_from

    reference = reference_from([{"saturated": 0.0}] * 5, "five volumes")
    with pytest.raises(InputError) as refused:
        check_fit(fit_score({"saturated": 0.5}, reference), reference, "brain-flair", enforce=True)
    worded = panel_wording(str(refused.value))
    assert "--no-fit-check" not in worded and "logic.detect(..., fit_check=False)" in worded


def bad_inputs(scene):
    vector = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), np.float32), name="rgb",
                                            nodeClassName="vtkMRMLVectorVolumeNode")
    label = add_volume(np.ones((4, 5, 6), np.uint8), name="labels", class_name="vtkMRMLLabelMapVolumeNode")
    flat = add_volume(np.zeros((1, 20, 20), np.float32), name="slice")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    return {"no volume": (None, "No input volume"), "vector volume": (vector, "vector"),
            "label map": (label, "label map"), "2D volume": (flat, "2D"), "no image data": (empty, "no image")}


@pytest.mark.parametrize("case", ["no volume", "vector volume", "label map", "2D volume", "no image data"])
def test_bad_input_gives_a_clear_error_before_any_job(scene, logic, jobs_dir, case):
    node, expected = bad_inputs(scene)[case]
    before = node_ids(scene)
    with pytest.raises(InputError, match=expected):
        logic.detect(node)
    with pytest.raises(InputError, match=expected):
        logic.start_detection(Parameters(input_volume=node))
    assert node_ids(scene) == before and not leftover_jobs(jobs_dir)


def test_bad_mask_gives_a_clear_error(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    empty_label = add_volume(np.zeros(SHAPE, np.uint8), name="nothing", class_name="vtkMRMLLabelMapVolumeNode")
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    before = node_ids(scene)
    with pytest.raises(InputError, match="empty"):
        logic.detect(node, maskNode=empty_label)
    with pytest.raises(InputError, match="segmentation or a label map"):
        logic.detect(node, maskNode=model)
    assert node_ids(scene) == before


def test_missing_model_gives_a_clear_error_before_any_job(scene, logic, tmp_path, jobs_dir):
    node = add_volume(lesion_volume(), name="flair")
    before = node_ids(scene)
    with pytest.raises(ModelFileError, match="no-such-model"):
        logic.detect(node, model="no-such-model")
    with pytest.raises(ModelFileError, match="gone.safetensors"):
        logic.detect(node, model=str(tmp_path / "gone.safetensors"))
    with pytest.raises(InputError, match="model name or a model file path"):
        logic.detect(node, model=object())
    assert node_ids(scene) == before and not leftover_jobs(jobs_dir)


def test_unknown_setting_is_an_input_error(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    with pytest.raises(InputError, match="stagez"):
        logic.detect(node, stagez=3)


def test_console_settings_reach_the_worker_as_given(scene, logic):
    """A console call's engine settings (here the map's blur, for small lesions) go to the worker's job
    unchanged, and a bad one is refused before any job starts."""
    from synomaly.inference.detection import DetectionSettings
    from synomaly.commands.worker import settings_from_dict

    node = add_volume(lesion_volume(), name="flair")
    request = logic.prepare_detection(node, blur_mm=0.75, min_component_mm3=20.0)
    settings = settings_from_dict(DetectionSettings, request.settings)
    assert (settings.blur_mm, settings.min_component_mm3) == (0.75, 20.0)
    with pytest.raises(InputError, match=r"blur \(mm\)"):
        logic.detect(node, blur_mm=-1.0)


def test_engine_result_that_cannot_be_written_leaves_no_nodes(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    before = node_ids(scene)
    request = logic.prepare_detection(node)
    result = threshold_result(request)
    result.counterfactual = result.counterfactual[:-1]
    with pytest.raises(RuntimeError, match="shape"):
        logic.apply_detection(request, result)
    assert node_ids(scene) == before


@pytest.mark.parametrize("message, flag, words", [
    ("--device cuda was asked for but CUDA is not available here (no NVIDIA GPU or a CPU-only torch); "
     "use --device cpu or auto.", "--device", "choose 'cpu' or 'auto' as the device"),
    ("the input volume looks like a label map (only the values [0, 1]); give the intensity image, and pass "
     "a label map as --mask if it is an organ mask.", "--mask", "as the Mask"),
    ("/m/a.run holds an earlier run; resume it (--resume) or delete the folder.", "--resume", "click Resume"),
    ("--device mps was asked for but Apple's mps is not available here (it needs a Mac with Apple silicon or an AMD "
     "GPU, macOS 12.3 or later, and a torch built with MPS); use --device cpu or auto.", "--device",
     "The device 'mps' was chosen but Apple's mps is not available here"),
    ("bf16 is not offered on Apple's mps device; use --precision fp32 or auto there, or --device cpu.", "--",
     "precision='fp32' (Python console)"),
])
def test_engine_messages_are_worded_for_the_panel(message, flag, words):
    worded = panel_wording(message)
    assert flag not in worded and words in worded
    assert panel_wording("No healthy cases: choose a folder.") == "No healthy cases: choose a folder."


# the worker process, with the real engine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained, very small model in the real file format: the real engine's plumbing, in seconds."""
    torch = pytest.importorskip("torch")
    from synomaly.files.model_file import save_model
    from synomaly.method.network import UNet, UNetConfig
    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.method.schedule import DiffusionSchedule

    torch.manual_seed(0)
    network = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                              num_heads=1, image_size=32))
    metadata = {"name": "tiny-untrained", "description": "untrained; for plumbing tests", "preset": "brain-flair",
                "preprocessing": PreprocessConfig(image_size=32).to_dict(),
                "schedule": DiffusionSchedule(1000).to_dict(), "inference": {"max_stages": 1}, "threshold": 0.1}
    return save_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", network, metadata)


def phantom_node(name="phantom"):
    phantom = make_phantom(shape=(12, 48, 48), seed=1)
    return add_volume(phantom.volume, oblique_matrix(spacing=phantom.geometry.spacing), name=name)


def test_real_engine_chain_in_a_worker_process(scene, tmp_path, tiny_model, jobs_dir):
    node = phantom_node()
    before = slicer.util.arrayFromVolume(node).copy()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    logic.save_parameters(Parameters(input_volume=node, model=str(tiny_model), device="cpu"))
    messages = []
    job = logic.start_detection(logic.parameters(), lambda f, m: messages.append(m))
    assert job.pid != os.getpid() and job.pid is not None
    outputs = job.wait()
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    for output in (outputs.counterfactual, outputs.anomaly_map):
        assert_same_grid(output, node)
        assert slicer.util.arrayFromVolume(output).dtype == np.float32
    assert segment_array(outputs.segmentation, node).shape == before.shape
    assert outputs.report["model"]["name"] == "tiny-untrained" and messages[-1] == "done"
    assert logic.parameters().report()["slices_processed"] > 0
    assert logic.parameters().segmentation is outputs.segmentation
    assert not leftover_jobs(jobs_dir), "the job folder is removed"


def test_mps_where_there_is_none_is_refused_in_the_panels_words(scene, tmp_path, tiny_model, jobs_dir):
    torch = pytest.importorskip("torch")
    if torch.backends.mps.is_available():
        pytest.skip("Apple's mps is available here")

    node = phantom_node()
    before = scene.GetNumberOfNodes()
    with pytest.raises(DeviceError, match="The device 'mps' was chosen but Apple's mps is not available here.*"
                                          "choose 'cpu' or 'auto' as the device"):
        SynomalyLogic(user_models_dir=tmp_path).detect(node, model=str(tiny_model), device="mps")
    assert scene.GetNumberOfNodes() == before and not leftover_jobs(jobs_dir)


def time_polling(logic, parameters, between_polls) -> float:
    start = time.perf_counter()
    job = logic.start_detection(parameters)
    while job.poll():
        between_polls()
    elapsed = time.perf_counter() - start
    assert job.state == SUCCEEDED, job.error
    return elapsed


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="needs the C library's usleep")
def test_a_run_is_not_slowed_by_a_main_thread_that_holds_the_gil(scene, tmp_path, tiny_model):
    """Slicer's main thread keeps the GIL while the Qt event loop waits between timer ticks. A C sleep
    through ctypes.PyDLL keeps it the same way; a Python worker thread then barely ran (50x slower)."""
    libc = ctypes.PyDLL(ctypes.util.find_library("c"))
    logic = SynomalyLogic(user_models_dir=tmp_path)
    parameters = Parameters(input_volume=phantom_node(), model=str(tiny_model), device="cpu", update_outputs=False)
    released = time_polling(logic, parameters, lambda: time.sleep(0.1))
    held = time_polling(logic, parameters, lambda: libc.usleep(100_000))
    assert held < 3 * released, f"{held:.1f} s with the GIL held between polls, {released:.1f} s without"


@POSIX_ONLY
def test_cancel_kills_the_worker_before_a_new_run(scene, tmp_path, tiny_model, jobs_dir):
    node = phantom_node()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    logic.save_parameters(Parameters(input_volume=node, model=str(tiny_model), device="cpu"))
    before = node_ids(scene)
    job = logic.start_detection(logic.parameters())
    pid = job.pid
    assert job.poll() and not process_gone(pid)
    job.cancel()
    assert process_gone(pid), "the process is gone when cancel() returns"
    assert not job.poll() and job.state == CANCELLED
    with pytest.raises(Cancelled):
        job.wait()
    assert node_ids(scene) == before and not leftover_jobs(jobs_dir)

    again = logic.start_detection(logic.parameters())
    assert again.wait() is not None and again.state == SUCCEEDED


@POSIX_ONLY
def test_a_worker_that_ignores_cancel_is_killed_with_its_children_after_the_grace_period(
        tmp_path, monkeypatch, jobs_dir):
    """A stand-in interpreter that starts a child and ignores SIGTERM and the cancel file."""
    child_file = tmp_path / "child.pid"
    script = tmp_path / "stubborn-python"
    script.write_text("#!/bin/sh\ntrap '' TERM\nsleep 60 &\necho $! > \"$CHILD_PID_FILE\"\nwait\n")
    script.chmod(0o755)
    monkeypatch.setenv("CHILD_PID_FILE", str(child_file))
    folder = Path(tempfile.mkdtemp(prefix="synomaly-job-"))
    job = WorkerJob(folder, {"kind": "training"}, grace_s=0.5, python=str(script)).start()
    deadline = time.monotonic() + 10
    while not (child_file.exists() and child_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child = int(child_file.read_text())
    job.cancel()
    assert (folder / "cancel").exists(), "the worker is asked first"
    assert job.poll() and not process_gone(job.pid), "and given the grace period to stop by itself"
    while job.poll():
        time.sleep(0.05)
    assert job.state == CANCELLED
    assert process_gone(job.pid)
    # The grandchild got its SIGKILL with the process group; the kernel ends it a moment later, not always
    # before this line: waited for (a deadline, not a race).
    deadline = time.monotonic() + 10
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process_gone(child)
    assert not leftover_jobs(jobs_dir)


@POSIX_ONLY
def test_a_worker_that_dies_is_a_failure_with_its_log(scene, tmp_path, tiny_model, jobs_dir):
    node = phantom_node()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    before = node_ids(scene)
    job = logic.start_detection(Parameters(input_volume=node, model=str(tiny_model), device="cpu"))
    os.kill(job.pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match="ended unexpectedly"):
        job.wait()
    assert job.state == FAILED and node_ids(scene) == before and not leftover_jobs(jobs_dir)


def test_worker_errors_come_back_as_engine_errors(scene, tmp_path, jobs_dir):
    node = phantom_node()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    logic = SynomalyLogic(user_models_dir=tmp_path)
    before = node_ids(scene)
    with pytest.raises(ModelFileError, match="broken.safetensors"):
        logic.detect(node, model=str(broken), device="cpu")
    assert node_ids(scene) == before and not leftover_jobs(jobs_dir)


def test_a_device_error_from_the_worker_is_in_the_panel_words(scene, tmp_path, tiny_model):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    logic = SynomalyLogic(user_models_dir=tmp_path)
    with pytest.raises(DeviceError) as caught:
        logic.detect(phantom_node(), model=str(tiny_model), device="cuda")
    assert "--device" not in str(caught.value) and "as the device" in str(caught.value)


def test_cancelled_synchronous_run_raises_and_adds_nothing(scene, tmp_path, tiny_model, jobs_dir):
    node = phantom_node()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    before = node_ids(scene)
    with pytest.raises(Cancelled):
        logic.detect(node, model=str(tiny_model), device="cpu", cancel=lambda: True)
    assert node_ids(scene) == before and not leftover_jobs(jobs_dir)


def demo_model_available():
    from synomaly.files.model_file import DEMO_MODEL, list_models

    try:
        return any(m.name == DEMO_MODEL for m in list_models())
    except Exception:
        return False


@pytest.mark.skipif(not demo_model_available(),
                    reason="the engine's bundled demo model 'demo-phantom' is not there yet")
def test_real_engine_finds_the_phantom_lesion(scene, tmp_path):
    from synomaly.commands.demo import DEMO_SEED

    phantom = make_phantom(seed=DEMO_SEED)
    node = add_volume(phantom.volume, phantom.geometry.ijk_to_ras(), name="phantom")
    before = slicer.util.arrayFromVolume(node).copy()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    messages = []
    outputs = logic.detect(node, model="demo-phantom", device="cpu", progress=lambda f, m: messages.append(f))
    assert messages and messages[-1] == pytest.approx(1.0)
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    for output in (outputs.counterfactual, outputs.anomaly_map):
        assert_same_grid(output, node)
    segment = segment_array(outputs.segmentation, node) > 0
    lesion = phantom.lesion_mask > 0
    assert segment.any(), "the demo model found nothing in a phantom with a lesion"
    assert (segment & lesion).sum() > 0.5 * lesion.sum(), "the segment should cover most of the lesion"
    score = slicer.util.arrayFromVolume(outputs.anomaly_map)
    assert score[lesion].mean() > 5 * score[~lesion].mean(), "the map should be brightest on the lesion"
    assert outputs.report["anomalous_volume_ml"] > 0


def test_engine_errors_share_one_base_class():
    assert issubclass(InputError, SynomalyError) and issubclass(Cancelled, SynomalyError)


def test_the_skull_strip_advice_is_worded_for_the_panel():
    """The whole-head refusal names the panel's Mask and the console's switch, no command-line flag."""
    from synomaly.inference.skullstrip import NOT_STRIPPED_HELP

    worded = panel_wording("the input does not look skull-stripped (12% of the background is constant): "
                           + NOT_STRIPPED_HELP)
    assert "--" not in worded
    assert "SwissSkullStripper" in worded and "as the Mask" in worded and "skull_check=False" in worded
