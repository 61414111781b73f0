"""Detection through the module's Qt-free logic on real MRML nodes (slicer-core).

A stand-in engine (thresholding, same interface as the real one) checks what the module does with
nodes; the real engine with the bundled demo model checks the whole chain once that model exists.
"""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_slicer_scene import add_volume, new_scene, node_ids, oblique_matrix, slicer  # noqa: F401

from SynomalyDetectionLib import MrmlBridge, Parameters, SynomalyLogic, format_report
from SynomalyDetectionLib.Engine import Engine
from SynomalyDetectionLib.JobRunner import CANCELLED, FAILED, SUCCEEDED, BackgroundJob
from synomaly.errors import Cancelled, InputError, ModelFileError, SynomalyError
from synomaly.phantom import make_phantom

SHAPE = (12, 48, 48)


class ThresholdEngine(Engine):
    """The engine's interface with a trivial detector: voxels above ``level`` are anomalous."""

    def __init__(self, level=0.8, block=None):
        self.level = level
        self.block = block  # an Event the detector waits on, polling cancel, to test cancelling mid-run
        self.calls = []

    def list_models(self, extra_dirs=()):
        from synomaly.model_file import ModelInfo

        infos = [ModelInfo("threshold", Path("/bundled/threshold.safetensors"), "test stand-in")]
        for folder in extra_dirs:
            infos += [ModelInfo(p.stem, p, "user") for p in sorted(Path(folder).glob("*.safetensors"))]
        return infos

    def default_model(self):
        return "threshold"

    def load_model(self, name_or_path, device="cpu"):
        return {"name": str(name_or_path)}

    def detect(self, volume, geometry, model, mask=None, settings=None, progress=None, cancel=None):
        from synomaly.detection import DetectionResult

        self.calls.append({"model": model, "settings": settings, "mask": mask, "geometry": geometry})
        for z in range(volume.shape[0]):
            if self.block is not None:
                while not self.block.is_set():
                    if cancel and cancel():
                        raise Cancelled("cancelled")
                    time.sleep(0.005)
            if cancel and cancel():
                raise Cancelled("cancelled")
            if progress:
                progress((z + 1) / volume.shape[0], f"slice {z + 1}/{volume.shape[0]}")
        score = np.clip(volume.astype(np.float32), 0, None)
        if mask is not None:
            score = score * mask
        seg = (score > self.level).astype(np.uint8)
        result = DetectionResult(score, seg, np.minimum(volume, self.level).astype(np.float32), None,
                                 {"anomalous_volume_ml": float(seg.sum() * geometry.voxel_volume_mm3 / 1000),
                                  "n_components": int(seg.any()), "components": [{"volume_ml": 0.1}],
                                  "max_score": float(score.max()), "mean_score": float(score.mean())})
        volume[...] = 0  # a careless engine: the input node must not notice, since it gets a copy
        return result


def lesion_volume(shape=SHAPE):
    volume = np.full(shape, 0.3, np.float32)
    volume[4:8, 20:30, 10:18] = 1.0
    return volume


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def logic(tmp_path):
    return SynomalyLogic(engine=ThresholdEngine(), user_models_dir=tmp_path / "models")


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


def test_detect_creates_three_aligned_outputs_beside_the_input(scene, logic):
    sh = MrmlBridge.subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    volume = lesion_volume()
    node = add_volume(volume, oblique_matrix(), name="flair")
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(0.9, 0.45)
    sh.CreateItem(study, node)
    before = slicer.util.arrayFromVolume(node).copy()

    outputs = logic.detect(node, threshold=0.5)

    check_outputs(outputs, node, volume > 0.8)
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    assert np.allclose(slicer.util.arrayFromVolume(outputs.counterfactual), np.minimum(volume, 0.8))
    counterfactual_display = outputs.counterfactual.GetDisplayNode()
    assert (counterfactual_display.GetWindow(), counterfactual_display.GetLevel()) == pytest.approx((0.9, 0.45))
    assert outputs.anomaly_map.GetDisplayNode().GetColorNodeID() == MrmlBridge.ANOMALY_MAP_COLOR_NODE_ID
    assert outputs.report["n_components"] == 1
    assert logic.engine.calls[0]["settings"].threshold == 0.5


def test_outputs_follow_the_input_transform(scene, logic):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node = add_volume(lesion_volume(), oblique_matrix(), name="moved")
    node.SetAndObserveTransformNodeID(transform.GetID())
    outputs = logic.detect(node)
    assert all(n.GetTransformNodeID() == transform.GetID() for n in outputs.nodes())


def test_mask_from_segmentation_and_label_map_reaches_the_engine(scene, logic):
    volume = lesion_volume()
    node = add_volume(volume, oblique_matrix(), name="flair")
    region = np.zeros(SHAPE, np.uint8)
    region[:, :26, :] = 1
    label = add_volume(region, oblique_matrix(), name="half", class_name="vtkMRMLLabelMapVolumeNode")
    outputs = logic.detect(node, maskNode=label)
    assert np.array_equal(logic.engine.calls[-1]["mask"], region > 0)
    assert np.array_equal(segment_array(outputs.segmentation, node) > 0, (volume > 0.8) & (region > 0))

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("brain")
    slicer.util.updateSegmentBinaryLabelmapFromArray(region, segmentation, segment_id, node)
    logic.detect(node, maskNode=segmentation)
    assert np.array_equal(logic.engine.calls[-1]["mask"], region > 0)


def test_label_map_mask_on_another_grid_is_resampled(scene, logic):
    node = add_volume(lesion_volume(), np.diag([1.0, 1.0, 2.0, 1.0]), name="flair")
    coarse = np.ones((6, 24, 24), np.uint8)
    label = add_volume(coarse, np.diag([2.0, 2.0, 4.0, 1.0]), name="coarse", class_name="vtkMRMLLabelMapVolumeNode")
    logic.detect(node, maskNode=label)
    mask = logic.engine.calls[-1]["mask"]
    assert mask.shape == SHAPE and mask[1:-1, 1:-1, 1:-1].all()


def test_rerun_updates_or_adds_outputs(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    first = logic.detect(node)
    count = scene.GetNumberOfNodes()
    again = logic.detect(node, outputs=first)
    assert [n.GetID() for n in again.nodes()] == [n.GetID() for n in first.nodes()]
    assert scene.GetNumberOfNodes() == count
    fresh = logic.detect(node)
    assert not {n.GetID() for n in fresh.nodes()} & {n.GetID() for n in first.nodes()}
    assert fresh.segmentation.GetName() != first.segmentation.GetName()


def test_background_detection_through_parameters_remembers_and_reuses_outputs(scene, logic):
    node = add_volume(lesion_volume(), oblique_matrix(), name="flair")
    params = Parameters(input_volume=node, model="threshold", update_outputs=True)
    logic.save_parameters(params)
    messages = []
    main = threading.get_ident()
    on_progress = lambda fraction, message: messages.append((fraction, message, threading.get_ident()))
    outputs = logic.start_detection(logic.parameters(), on_progress).wait()
    assert messages and all(thread == main for _, _, thread in messages)
    assert messages[-1][0] == pytest.approx(1.0)
    stored = logic.parameters()
    assert stored.segmentation is outputs.segmentation and stored.anomaly_map is outputs.anomaly_map
    assert stored.report()["n_components"] == 1
    second = logic.start_detection(logic.parameters()).wait()
    assert second.segmentation is outputs.segmentation
    stored.update_outputs = False
    third = logic.start_detection(stored).wait()
    assert third.segmentation is not outputs.segmentation


def test_update_mode_never_overwrites_the_outputs_of_another_input(scene, logic):
    first = add_volume(lesion_volume(), name="first")
    second = add_volume(lesion_volume() * 0.5, name="second")
    logic.save_parameters(Parameters(input_volume=first, update_outputs=True))
    outputs_first = logic.start_detection(logic.parameters()).wait()
    params = logic.parameters()
    params.input_volume = second
    outputs_second = logic.start_detection(params).wait()
    assert outputs_second.segmentation is not outputs_first.segmentation
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


def test_cancel_leaves_no_new_nodes(scene, tmp_path):
    gate = threading.Event()
    logic = SynomalyLogic(engine=ThresholdEngine(block=gate), user_models_dir=tmp_path)
    node = add_volume(lesion_volume(), name="flair")
    logic.save_parameters(Parameters(input_volume=node))
    before = node_ids(scene)
    job = logic.start_detection(logic.parameters())
    assert job.poll()
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait()
    assert job.state == CANCELLED
    assert node_ids(scene) == before


def test_cancel_after_the_engine_finished_still_writes_nothing(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    logic.save_parameters(Parameters(input_volume=node))
    before = node_ids(scene)
    job = logic.start_detection(logic.parameters())
    job._thread.join()
    job.cancel()
    assert not job.poll() and job.state == CANCELLED
    assert node_ids(scene) == before


def test_cancelled_synchronous_run_raises_and_adds_nothing(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    before = node_ids(scene)
    with pytest.raises(Cancelled):
        logic.detect(node, cancel=lambda: True)
    assert node_ids(scene) == before


def bad_inputs(scene):
    vector = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6, 3), np.float32), name="rgb",
                                            nodeClassName="vtkMRMLVectorVolumeNode")
    label = add_volume(np.ones((4, 5, 6), np.uint8), name="labels", class_name="vtkMRMLLabelMapVolumeNode")
    flat = add_volume(np.zeros((1, 20, 20), np.float32), name="slice")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    return {"no volume": (None, "No input volume"), "vector volume": (vector, "vector"),
            "label map": (label, "label map"), "2D volume": (flat, "2D"), "no image data": (empty, "no image")}


@pytest.mark.parametrize("case", ["no volume", "vector volume", "label map", "2D volume", "no image data"])
def test_bad_input_gives_a_clear_error_and_no_nodes(scene, logic, case):
    node, expected = bad_inputs(scene)[case]
    before = node_ids(scene)
    with pytest.raises(InputError, match=expected):
        logic.detect(node)
    with pytest.raises(InputError, match=expected):
        logic.start_detection(Parameters(input_volume=node))
    assert node_ids(scene) == before
    assert not logic.engine.calls


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


def test_missing_model_gives_a_clear_error_and_no_nodes(scene, logic, tmp_path):
    node = add_volume(lesion_volume(), name="flair")
    before = node_ids(scene)
    with pytest.raises(ModelFileError, match="no-such-model"):
        logic.detect(node, model="no-such-model")
    with pytest.raises(ModelFileError, match="gone.safetensors"):
        logic.detect(node, model=str(tmp_path / "gone.safetensors"))
    assert node_ids(scene) == before and not logic.engine.calls


def test_unknown_setting_is_an_input_error(scene, logic):
    node = add_volume(lesion_volume(), name="flair")
    with pytest.raises(InputError, match="stagez"):
        logic.detect(node, stagez=3)


def test_engine_result_that_cannot_be_written_leaves_no_nodes(scene, tmp_path):
    class WrongShape(ThresholdEngine):
        def detect(self, volume, *args, **kwargs):
            result = super().detect(volume, *args, **kwargs)
            result.counterfactual = result.counterfactual[:-1]
            return result

    logic = SynomalyLogic(engine=WrongShape(), user_models_dir=tmp_path)
    node = add_volume(lesion_volume(), name="flair")
    before = node_ids(scene)
    job = logic.start_detection(Parameters(input_volume=node))
    with pytest.raises(RuntimeError, match="shape"):
        job.wait()
    assert job.state == FAILED and node_ids(scene) == before


def test_job_runner_reports_failures_and_results():
    job = BackgroundJob(lambda progress, cancel: 1 / 0).start()
    with pytest.raises(ZeroDivisionError):
        job.wait()
    assert job.state == FAILED
    seen = []
    job = BackgroundJob(lambda progress, cancel: progress(3) or 5, finish=lambda raw: raw * 2,
                        on_progress=seen.append).start()
    assert job.wait() == 10 and job.state == SUCCEEDED and seen == [3]
    assert not job.poll()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained, very small model in the real file format: the real engine's plumbing, in seconds."""
    torch = pytest.importorskip("torch")
    from synomaly.model_file import save_model
    from synomaly.network import UNet, UNetConfig
    from synomaly.preprocessing import PreprocessConfig
    from synomaly.schedule import DiffusionSchedule

    torch.manual_seed(0)
    network = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                              num_heads=1, image_size=32))
    metadata = {"name": "tiny-untrained", "description": "untrained; for plumbing tests", "preset": "brain-flair",
                "preprocessing": PreprocessConfig(image_size=32).to_dict(),
                "schedule": DiffusionSchedule(1000).to_dict(), "inference": {"max_stages": 1}, "threshold": 0.1}
    return save_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", network, metadata)


def test_real_engine_chain_with_a_tiny_model(scene, tmp_path, tiny_model):
    phantom = make_phantom(shape=(12, 48, 48), seed=1)
    node = add_volume(phantom.volume, oblique_matrix(spacing=phantom.geometry.spacing), name="phantom")
    before = slicer.util.arrayFromVolume(node).copy()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    logic.save_parameters(Parameters(input_volume=node, model=str(tiny_model), device="cpu"))
    messages = []
    outputs = logic.start_detection(logic.parameters(), lambda f, m: messages.append(m)).wait()
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    for output in (outputs.counterfactual, outputs.anomaly_map):
        assert_same_grid(output, node)
        assert slicer.util.arrayFromVolume(output).dtype == np.float32
    assert segment_array(outputs.segmentation, node).shape == before.shape
    assert outputs.report["model"]["name"] == "tiny-untrained" and messages[-1] == "done"
    assert logic.parameters().report()["slices_processed"] > 0


def test_real_engine_cancel_leaves_no_new_nodes(scene, tmp_path, tiny_model):
    node = add_volume(make_phantom(shape=(12, 48, 48), seed=1).volume, name="phantom")
    logic = SynomalyLogic(user_models_dir=tmp_path)
    before = node_ids(scene)
    with pytest.raises(Cancelled):
        logic.detect(node, model=str(tiny_model), device="cpu", cancel=lambda: True)
    assert node_ids(scene) == before


def demo_model_available():
    from synomaly.model_file import DEMO_MODEL, list_models

    try:
        return any(m.name == DEMO_MODEL for m in list_models())
    except Exception:
        return False


@pytest.mark.skipif(not demo_model_available(),
                    reason="the engine's bundled demo model 'demo-phantom' is not there yet")
def test_real_engine_finds_the_phantom_lesion(scene, tmp_path):
    pytest.importorskip("torch")
    from synomaly.demo import DEMO_SEED

    phantom = make_phantom(seed=DEMO_SEED)
    node = add_volume(phantom.volume, phantom.geometry.ijk_to_ras(), name="phantom")
    before = slicer.util.arrayFromVolume(node).copy()
    logic = SynomalyLogic(user_models_dir=tmp_path)
    outputs = logic.detect(node, model="demo-phantom", device="cpu")
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
