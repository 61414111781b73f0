"""Retraining through the module's logic: healthy cases from a folder or from volume nodes, the loss plot,
cancel and resume in the worker process, and the new model joining the model list."""
import time
from pathlib import Path

import numpy as np
import pytest

from test_slicer_detection import jobs_dir  # noqa: F401 (autouse: job folders in tmp_path)
from test_slicer_scene import add_segmentation, add_volume, new_scene, node_ids, oblique_matrix, slicer  # noqa: F401

from SynomalyDetectionLib import MrmlBridge, Parameters, SynomalyLogic
from SynomalyDetectionLib.JobRunner import CANCELLED, SUCCEEDED
from SynomalyDetectionLib.Logic import HealthyVolume
from SynomalyDetectionLib.LossCurve import LossCurve
from synomaly.errors import Cancelled, InputError, OutputError
from synomaly.evaluation.phantom import make_phantom

# A network small enough for a few CPU steps a second; calibration with one stage.
TINY = dict(batch_size=2, image_size=32, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(), validation_fraction=0.5, preview_every=1000, inference={"max_stages": 1})


@pytest.fixture
def scene():
    return new_scene()


def healthy_folder(tmp_path):
    folder = tmp_path / "healthy"
    folder.mkdir()
    (folder / "case1.nii.gz").write_bytes(b"")
    return folder


def healthy_nodes(count=4):
    nodes = []
    for seed in range(count):
        phantom = make_phantom(shape=(10, 48, 48), seed=seed, lesion=False)
        nodes.append(add_volume(phantom.volume, phantom.geometry.ijk_to_ras(), name=f"healthy-{seed}"))
    return nodes


def test_a_folder_request_names_the_model_file_in_the_user_models_folder(scene, tmp_path):
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    request = logic.prepare_training(healthy_folder(tmp_path), "Site A v2", preset="liver-ct", steps=12, device="cpu")
    assert request.output == tmp_path / "models" / "Site-A-v2.safetensors"
    assert request.healthy == [(tmp_path / "healthy").resolve()]
    assert {k: request.settings[k] for k in ("preset", "steps", "device", "name")} == {
        "preset": "liver-ct", "steps": 12, "device": "cpu", "name": "Site A v2"}


def test_volume_nodes_are_copied_with_their_geometry(scene, tmp_path):
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    data = np.random.default_rng(0).random((6, 8, 10)).astype(np.float32)
    nodes = [add_volume(data, oblique_matrix(), name="healthy-1"), add_volume(data * 2, name="healthy-2")]
    cases = logic.prepare_training(nodes, "from-nodes", steps=3).healthy
    assert all(isinstance(c, HealthyVolume) for c in cases)
    assert [c.name for c in cases] == ["healthy-1", "healthy-2"]
    assert np.array_equal(cases[0].array, data) and np.allclose(cases[0].geometry.ijk_to_ras(), oblique_matrix())
    cases[0].array[:] = 0
    assert np.array_equal(slicer.util.arrayFromVolume(nodes[0]), data)


@pytest.mark.parametrize("healthy, name, preset, message", [
    ([], "ok", "brain-flair", "No healthy cases"),
    ("/no/such/folder", "ok", "brain-flair", "Not found"),
    (None, "  ", "brain-flair", "name"),
    (None, "ok", "knee-xray", "Unknown preset"),
])
def test_bad_training_requests_are_input_errors_before_any_job(scene, tmp_path, jobs_dir, healthy, name, preset,
                                                                message):
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    with pytest.raises(InputError, match=message):
        logic.train(healthy_folder(tmp_path) if healthy is None else healthy, name, preset=preset)
    assert not list(jobs_dir.iterdir())


@pytest.mark.parametrize("folder", ["", ".", " "])
def test_the_panel_refuses_to_train_before_a_folder_is_chosen(scene, tmp_path, jobs_dir, folder):
    """A directory button holds "." until a folder is chosen: training then scanned the working folder."""
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    parameters = Parameters(training_from_folder=True, training_folder=folder, model_name="x")
    assert parameters.training_source() == []
    with pytest.raises(InputError, match="No healthy cases"):
        logic.start_training(parameters)
    assert not list(jobs_dir.iterdir())
    with pytest.raises(InputError, match="No healthy cases"):
        logic.start_training(Parameters(training_from_folder=False, model_name="x"))


def test_a_models_folder_that_cannot_be_made_is_an_output_error(scene, tmp_path, jobs_dir):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    logic = SynomalyLogic(user_models_dir=blocker / "models")
    with pytest.raises(OutputError, match="SYNOMALY_MODELS_DIR"):
        logic.train(healthy_nodes(1), "x", steps=1)
    assert not list(jobs_dir.iterdir())


def test_label_maps_are_not_healthy_cases(scene, tmp_path):
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    label = add_volume(np.ones((4, 5, 6), np.uint8), name="labels", class_name="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="label map"):
        logic.train([label], "x")


def finite_steps(progress):
    return [int(step) for step, _, loss, _ in progress if loss == loss]


@pytest.mark.slow
def test_panel_training_plots_the_loss_then_cancel_keeps_a_checkpoint_that_resume_continues(
        scene, tmp_path, jobs_dir):
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    logic.save_parameters(Parameters(training_from_folder=False, training_volumes=healthy_nodes(),
                                     model_name="site-b", steps=2000, training_device="cpu"))
    seen = []
    job = logic.start_training(logic.parameters(), on_progress=lambda *args: seen.append(args), **TINY)
    deadline = time.monotonic() + 120
    while not any(step >= 3 for step in finite_steps(seen)):
        assert job.poll(), job.error
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.cancel()
    with pytest.raises(Cancelled, match="resume"):
        job.wait()
    assert job.state == CANCELLED
    stopped_at = max(finite_steps(seen))
    table = logic.parameters().loss_table
    assert table is logic.loss_curve.table
    assert [step for step, _ in LossCurve(scene, table).points()] == list(range(1, stopped_at + 1))
    assert not (tmp_path / "models" / "site-b.safetensors").exists()

    parameters = logic.parameters()
    parameters.steps = stopped_at + 2
    resumed = []
    job = logic.start_training(parameters, resume=True, on_progress=lambda *args: resumed.append(args), **TINY)
    entry = job.wait()
    assert job.state == SUCCEEDED
    assert min(finite_steps(resumed)) == stopped_at + 1, "the worker saved a checkpoint when asked to stop"
    curve = LossCurve(scene, logic.parameters().loss_table)
    assert curve.table is table, "resuming continues the same plot"
    assert [step for step, _ in curve.points()] == list(range(1, stopped_at + 3))
    assert entry.identifier == str(tmp_path / "models" / "site-b.safetensors") and entry in logic.models()
    assert not list(jobs_dir.iterdir())

    nodes = node_ids(scene)
    parameters.model_name = "site-c"
    job = logic.start_training(parameters, **TINY)
    assert logic.loss_curve.points() == [] and logic.loss_curve.table is table, "a new run clears the same plot"
    assert node_ids(scene) == nodes
    job.stop(timeout_s=0)
    assert job.state == CANCELLED and not list(jobs_dir.iterdir())


@pytest.mark.slow
def test_real_engine_trains_from_volume_nodes_and_the_model_detects(scene, tmp_path):
    """A few steps of real training on phantom volume nodes in the worker; the model joins the list and runs."""
    nodes = healthy_nodes()
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    entry = logic.train(nodes, "tiny", steps=2, device="cpu", **TINY)
    assert Path(entry.identifier).is_file() and entry in logic.models()
    outputs = logic.detect(nodes[0], model=entry.identifier, device="cpu")
    assert outputs.report["model"]["name"] == "tiny"


# --- presets that need a mask: each loaded volume's from the segmentation made on it ---------------

def box(shape, z, y, x):
    mask = np.zeros(shape, bool)
    mask[z, y, x] = True
    return mask


def test_a_liver_model_from_loaded_volumes_without_masks_is_refused_naming_them(scene, tmp_path, jobs_dir):
    nodes = healthy_nodes(3)
    shape = slicer.util.arrayFromVolume(nodes[0]).shape
    add_segmentation(nodes[1], [("liver", box(shape, slice(2, 8), slice(10, 30), slice(10, 30)))], "CT 1 segments")
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    with pytest.raises(InputError) as error:
        logic.train(nodes, "liver-site", preset="liver-ct", steps=2, device="cpu")
    message = str(error.value)
    assert message.startswith("No liver mask for 2 of 3 volumes ('healthy-0', 'healthy-2')"), message
    assert "Segment the liver on each volume" in message and "TotalSegmentator" in message
    assert not list(jobs_dir.iterdir())


def test_each_volume_takes_the_liver_segment_made_on_it_and_never_a_detection_output(scene, tmp_path):
    nodes = healthy_nodes(3)
    shape = slicer.util.arrayFromVolume(nodes[0]).shape
    liver = [box(shape, slice(2, 8), slice(10, 30 + i), slice(12, 34)) for i in range(3)]
    # A whole-body segmentation (the liver among other organs), a single unnamed segment, a label map pair.
    add_segmentation(nodes[0], [("spleen", box(shape, slice(0, 4), slice(0, 8), slice(0, 8))), ("Liver", liver[0])],
                    "CT 0 total")
    add_segmentation(nodes[1], [("Segment_1", liver[1])], "CT 1 drawn")
    label = add_volume(liver[2].astype(np.uint8), MrmlBridge.ijk_to_ras(nodes[2]), name="CT 2 liver",
                       class_name="vtkMRMLLabelMapVolumeNode")
    # What detection made on a volume (its anomalies) is never taken as a mask, even with one segment.
    output = add_segmentation(nodes[1], [("Anomaly", liver[0])], "CT 1 anomalies")
    output.SetAttribute(MrmlBridge.INPUT_ATTRIBUTE, nodes[1].GetID())
    add_segmentation(nodes[2], [("Anomaly", liver[0])], "CT 2 anomalies").SetAttribute(
        MrmlBridge.INPUT_ATTRIBUTE, nodes[2].GetID())

    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    cases = logic.prepare_training([nodes[0], nodes[1], (nodes[2], label)], "liver-site", preset="liver-ct").healthy
    for case, expected in zip(cases, liver):
        assert np.array_equal(case.mask, expected), case.name

    # Two segmentations that could both be a volume's mask: which one is not guessed.
    add_segmentation(nodes[1], [("Segment_1", liver[0])], "CT 1 drawn again")
    with pytest.raises(InputError, match="Several segmentations made on 'healthy-1'.*CT 1 drawn, CT 1 drawn again"):
        logic.prepare_training(nodes[:2], "liver-site", preset="liver-ct")


@pytest.mark.slow
def test_a_liver_model_trains_from_loaded_volumes_with_their_masks(scene, tmp_path):
    """The masks reach the worker: the engine refuses a liver-ct case without one, so a model means they did."""
    nodes = healthy_nodes(3)
    shape = slicer.util.arrayFromVolume(nodes[0]).shape
    for index, node in enumerate(nodes):
        add_segmentation(node, [("liver", box(shape, slice(1, 9), slice(8, 40), slice(8, 40)))], f"CT {index}")
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    entry = logic.train(nodes, "tiny-liver", preset="liver-ct", steps=2, device="cpu", **TINY)
    assert entry.preset == "liver-ct" and Path(entry.identifier).is_file()
