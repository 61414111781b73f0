"""Retraining through the module's logic: healthy cases from a folder or from volume nodes, the loss plot,
cancel and resume, and the new model joining the model list."""
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_slicer_scene import add_volume, new_scene, node_ids, oblique_matrix, slicer  # noqa: F401

from SynomalyDetectionLib import Parameters, SynomalyLogic
from SynomalyDetectionLib.Engine import Engine
from SynomalyDetectionLib.JobRunner import CANCELLED, SUCCEEDED
from SynomalyDetectionLib.LossCurve import LossCurve
from synomaly.errors import Cancelled, InputError
from synomaly.phantom import make_phantom


class RecordingTrainer(Engine):
    """The engine's training interface: records the call, reports a falling loss, writes a model file."""

    def __init__(self, steps_done_before_cancel=None):
        self.calls = []
        self.gate = threading.Event()
        self.stop_after = steps_done_before_cancel

    def list_models(self, extra_dirs=()):
        from synomaly.model_file import ModelInfo

        infos = [ModelInfo("brain-flair", Path("/bundled/brain-flair.safetensors"), "bundled")]
        for folder in extra_dirs:
            infos += [ModelInfo(p.stem, p, f"user model {p.stem}") for p in sorted(Path(folder).glob("*.safetensors"))]
        return infos

    def train(self, healthy, output, settings=None, progress=None, cancel=None, resume=False):
        self.calls.append({"healthy": healthy, "output": Path(output), "settings": settings, "resume": resume})
        progress = progress or (lambda *args: None)
        start = 5 if resume else 0
        progress(start, settings.steps, float("nan"), "extracting slices")
        for step in range(start + 1, settings.steps + 1):
            if self.stop_after is not None and step > self.stop_after and not resume:
                while not (cancel and cancel()):
                    time.sleep(0.005)
            if cancel and cancel():
                raise Cancelled(f"training cancelled at step {step - 1}; resume to continue.")
            progress(step, settings.steps, 1.0 / step, f"step {step}/{settings.steps}")
        Path(output).write_bytes(b"model")
        return output


@pytest.fixture
def scene():
    return new_scene()


def healthy_folder(tmp_path):
    folder = tmp_path / "healthy"
    folder.mkdir()
    (folder / "case1.nii.gz").write_bytes(b"")
    return folder


def test_train_from_a_folder_writes_into_the_user_models_folder(scene, tmp_path):
    engine = RecordingTrainer()
    logic = SynomalyLogic(engine=engine, user_models_dir=tmp_path / "models")
    progress = []
    entry = logic.train(healthy_folder(tmp_path), "Site A v2", preset="liver-ct", steps=12, device="cpu",
                        progress=lambda *args: progress.append(args))
    call = engine.calls[0]
    assert call["output"] == tmp_path / "models" / "Site-A-v2.safetensors"
    assert call["healthy"] == [tmp_path / "healthy"]
    settings = call["settings"]
    assert (settings.preset, settings.steps, settings.device, settings.name) == ("liver-ct", 12, "cpu", "Site A v2")
    assert progress[-1][:2] == (12, 12)
    assert entry.name == "Site-A-v2" and not entry.bundled and entry.identifier == str(call["output"])
    assert entry in logic.models()


def test_train_from_volume_nodes_passes_arrays_and_geometry(scene, tmp_path):
    engine = RecordingTrainer()
    logic = SynomalyLogic(engine=engine, user_models_dir=tmp_path / "models")
    data = np.random.default_rng(0).random((6, 8, 10)).astype(np.float32)
    nodes = [add_volume(data, oblique_matrix(), name="healthy-1"), add_volume(data * 2, name="healthy-2")]
    logic.train(nodes, "from-nodes", steps=3)
    cases = engine.calls[0]["healthy"]
    assert [c.name for c in cases] == ["healthy-1", "healthy-2"]
    assert np.array_equal(cases[0].image, data) and np.allclose(cases[0].geometry.ijk_to_ras(), oblique_matrix())
    cases[0].image[:] = 0
    assert np.array_equal(slicer.util.arrayFromVolume(nodes[0]), data)


@pytest.mark.parametrize("healthy, name, preset, message", [
    ([], "ok", "brain-flair", "No healthy cases"),
    ("/no/such/folder", "ok", "brain-flair", "Not found"),
    (None, "  ", "brain-flair", "name"),
    (None, "ok", "knee-xray", "Unknown preset"),
])
def test_bad_training_requests_are_input_errors(scene, tmp_path, healthy, name, preset, message):
    logic = SynomalyLogic(engine=RecordingTrainer(), user_models_dir=tmp_path / "models")
    with pytest.raises(InputError, match=message):
        logic.train(healthy_folder(tmp_path) if healthy is None else healthy, name, preset=preset)
    assert not logic.engine.calls


def test_label_maps_are_not_healthy_cases(scene, tmp_path):
    logic = SynomalyLogic(engine=RecordingTrainer(), user_models_dir=tmp_path / "models")
    label = add_volume(np.ones((4, 5, 6), np.uint8), name="labels", class_name="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="label map"):
        logic.train([label], "x")


def test_background_training_plots_the_loss_then_cancel_and_resume(scene, tmp_path):
    engine = RecordingTrainer(steps_done_before_cancel=5)
    logic = SynomalyLogic(engine=engine, user_models_dir=tmp_path / "models")
    folder = healthy_folder(tmp_path)
    logic.save_parameters(Parameters(training_folder=str(folder), model_name="site-b", steps=10))
    seen = []
    job = logic.start_training(logic.parameters(), on_progress=lambda *args: seen.append(args))
    while not any(step == 5 for step, *_ in seen):
        assert job.poll()
        time.sleep(0.01)
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait()
    assert job.state == CANCELLED
    table = logic.parameters().loss_table
    assert table is logic.loss_curve.table
    assert [step for step, _ in LossCurve(scene, table).points()] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "models" / "site-b.safetensors").exists()

    job = logic.start_training(logic.parameters(), resume=True)
    entry = job.wait()
    assert job.state == SUCCEEDED and engine.calls[-1]["resume"]
    curve = LossCurve(scene, logic.parameters().loss_table)
    assert curve.table is table, "resuming continues the same plot"
    assert [step for step, _ in curve.points()] == list(range(1, 11))
    assert curve.chart.GetNthPlotSeriesNode(0).GetTableNode() is table
    assert entry.identifier == str(tmp_path / "models" / "site-b.safetensors")


def test_a_new_training_run_starts_a_clean_plot(scene, tmp_path):
    logic = SynomalyLogic(engine=RecordingTrainer(), user_models_dir=tmp_path / "models")
    logic.save_parameters(Parameters(training_folder=str(healthy_folder(tmp_path)), model_name="a", steps=4))
    logic.start_training(logic.parameters()).wait()
    nodes = node_ids(scene)
    params = logic.parameters()
    params.model_name = "b"
    logic.save_parameters(params)
    logic.start_training(logic.parameters()).wait()
    assert node_ids(scene) == nodes, "the plot nodes are reused"
    assert [step for step, _ in logic.loss_curve.points()] == [1, 2, 3, 4]


def test_real_engine_trains_from_volume_nodes_and_the_model_detects(scene, tmp_path):
    """A few steps of real training on phantom volume nodes; the model joins the list and runs."""
    pytest.importorskip("torch")
    nodes = []
    for seed in range(4):
        phantom = make_phantom(shape=(10, 48, 48), seed=seed, lesion=False)
        nodes.append(add_volume(phantom.volume, phantom.geometry.ijk_to_ras(), name=f"healthy-{seed}"))
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    entry = logic.train(nodes, "tiny", steps=2, device="cpu", batch_size=2, image_size=32, base_channels=8,
                        channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), validation_fraction=0.5,
                        preview_every=1000)
    assert Path(entry.identifier).is_file() and entry in logic.models()
    outputs = logic.detect(nodes[0], model=entry.identifier, device="cpu")
    assert outputs.report["model"]["name"] == "tiny"
