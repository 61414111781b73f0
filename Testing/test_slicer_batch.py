"""Several volumes from the panel (issue 20): the checked volumes run one after another under one progress,
polled as the widget's timer polls a job, on the path of ``detect_many``; a cancel or a failure keeps the
outputs of the volumes done before it. Real MRML (slicer-core) and real worker processes (a tiny model)."""
import time

import numpy as np
import pytest

from test_slicer_detection import jobs_dir, leftover_jobs, phantom_node, tiny_model  # noqa: F401
from test_slicer_scene import new_scene, slicer

from SynomalyDetectionLib import MrmlBridge, Parameters, SynomalyLogic
from SynomalyDetectionLib.Batch import DetectionBatch, finished_outputs
from SynomalyDetectionLib.JobRunner import CANCELLED, FAILED, SUCCEEDED, WorkerJob, process_gone
from SynomalyDetectionLib.Panel import select_data, set_checked_nodes
from synomaly.errors import Cancelled, InputError


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def logic(tmp_path):
    return SynomalyLogic(user_models_dir=tmp_path / "models")


def panel_batch(logic, tiny_model, nodes, **values):
    values = dict(dict(several_inputs=True, input_volumes=nodes, model=str(tiny_model), device="cpu"), **values)
    logic.save_parameters(Parameters(input_volume=nodes[0], **values))
    return logic.parameters()


def poll_until(job, condition=lambda: False, deadline_s=300):
    """As the widget's timer does, until the job ends or ``condition()`` holds."""
    deadline = time.monotonic() + deadline_s
    while job.poll() and not condition():
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.02)


def test_the_panel_runs_the_checked_volumes_one_after_another_under_one_progress(scene, logic, tiny_model,
                                                                                  jobs_dir):
    nodes = [phantom_node("first"), phantom_node("second")]
    seen = []
    job = logic.start_detection(panel_batch(logic, tiny_model, nodes), lambda f, m: seen.append((f, m)))
    assert isinstance(job, DetectionBatch) and job.pid is not None
    poll_until(job)
    outputs = finished_outputs(job)
    assert job.state == SUCCEEDED and job.error is None and job.stopped_at == ""
    assert [o.input_node for o in outputs] == nodes and job.result == outputs
    assert all(b >= a for (a, _), (b, _) in zip(seen, seen[1:])), "one progress for the whole batch"
    assert seen[0][1].startswith("[1/2] first:") and seen[-1] == (pytest.approx(1.0), "[2/2] second: done")
    stored = logic.parameters()
    assert stored.segmentation is outputs[-1].segmentation, "the panel shows the last volume's outputs and report"
    assert stored.report() == outputs[-1].report
    assert not leftover_jobs(jobs_dir)

    again = logic.start_detection(logic.parameters())  # "Update previous outputs" (the default): in place
    poll_until(again)
    assert [[n.GetID() for n in o.nodes()] for o in finished_outputs(again)] == [
        [n.GetID() for n in o.nodes()] for o in outputs]


def test_a_cancel_keeps_the_volumes_done_and_starts_no_other(scene, logic, tiny_model, jobs_dir):
    nodes = [phantom_node("first"), phantom_node("second"), phantom_node("third")]
    job = logic.start_detection(panel_batch(logic, tiny_model, nodes))
    poll_until(job, lambda: job.current == 1)
    second = job.pid
    assert job.current == 1 and not job.done, "the second volume's worker runs"
    job.cancel()
    assert job.cancelling
    poll_until(job)
    assert job.state == CANCELLED and job.stopped_at == "second" and process_gone(second)
    assert [o.input_node for o in finished_outputs(job)] == nodes[:1]
    assert MrmlBridge.latest_outputs(nodes[1]) is None and MrmlBridge.latest_outputs(nodes[2]) is None
    assert not leftover_jobs(jobs_dir)


def test_a_volume_removed_during_the_batch_fails_it_and_the_outputs_before_stay(scene, logic, tiny_model, jobs_dir):
    nodes = [phantom_node("first"), phantom_node("gone")]
    job = logic.start_detection(panel_batch(logic, tiny_model, nodes))
    scene.RemoveNode(nodes[1])
    poll_until(job)
    assert job.state == FAILED and isinstance(job.error, InputError) and "'gone'" in str(job.error)
    assert job.stopped_at == "gone" and [o.input_node for o in finished_outputs(job)] == nodes[:1]
    assert not leftover_jobs(jobs_dir)


def test_every_checked_volume_is_checked_before_any_run(scene, logic, tiny_model, jobs_dir):
    label = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.uint8), name="labels",
                                           nodeClassName="vtkMRMLLabelMapVolumeNode")
    parameters = panel_batch(logic, tiny_model, [phantom_node("fine"), label])
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="'labels' is a label map"):
        logic.start_detection(parameters)
    assert scene.GetNumberOfNodes() == before and not leftover_jobs(jobs_dir)
    with pytest.raises(InputError, match="No input volumes"):
        logic.start_detection(panel_batch(logic, tiny_model, [phantom_node()], input_volumes=[]))


def test_detect_button_says_what_a_batch_lacks(scene, logic, tiny_model):
    node = phantom_node()
    assert logic.detection_blocker(Parameters(several_inputs=True)) == "Check the volumes to analyse."
    assert logic.detection_blocker(Parameters(input_volume=node, several_inputs=True)) == "Check the volumes to analyse."
    assert logic.detection_blocker(Parameters(several_inputs=True, input_volumes=[node], model=str(tiny_model))) == ""
    assert logic.detection_blocker(Parameters()) == "Choose an input volume."


def test_stopping_a_batch_when_the_scene_closes_ends_its_worker(scene, logic, tiny_model, jobs_dir):
    nodes = [phantom_node("first"), phantom_node("second")]
    job = logic.start_detection(panel_batch(logic, tiny_model, nodes))
    pid = job.pid
    job.stop()
    assert job.done and job.state == CANCELLED and process_gone(pid)
    assert finished_outputs(job) == [] and not leftover_jobs(jobs_dir)
    job.release()
    assert job.state == CANCELLED


def test_a_console_batch_waits_and_can_be_cancelled_between_polls(scene, logic, tiny_model, jobs_dir):
    """Asked after the poll that wrote the first volume's outputs and started the second run."""
    nodes = [phantom_node("first"), phantom_node("second")]
    with pytest.raises(Cancelled):
        logic.detect_many(nodes, model=str(tiny_model), device="cpu",
                          cancel=lambda: MrmlBridge.latest_outputs(nodes[0]) is not None)
    assert MrmlBridge.latest_outputs(nodes[0]) is not None and MrmlBridge.latest_outputs(nodes[1]) is None
    assert not leftover_jobs(jobs_dir)


def test_one_volumes_outputs_are_its_finished_outputs(scene, logic, tiny_model):
    parameters = panel_batch(logic, tiny_model, [phantom_node()], several_inputs=False)
    job = logic.start_detection(parameters)
    assert isinstance(job, WorkerJob) and finished_outputs(job) == []
    poll_until(job)
    assert finished_outputs(job) == [job.result]


class Layout:
    """What show_results asks of Slicer's layout manager."""

    def __init__(self):
        self.calls = []

    def setLayout(self, layout):
        self.calls.append(("setLayout", layout))

    def resetSliceViews(self):
        self.calls.append(("resetSliceViews",))


def test_results_switch_the_layout_only_when_red_and_yellow_are_not_shown(scene, logic, tiny_model):
    outputs = logic.detect(phantom_node(), model=str(tiny_model), device="cpu")
    views = {}
    for name in ("Red", "Yellow"):
        views[name] = scene.AddNewNodeByClass("vtkMRMLSliceNode", name)
        views[name].SetLayoutName(name)
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetLayoutName(name)
    layout = Layout()
    MrmlBridge.show_results(outputs, layout)
    assert layout.calls == [("setLayout", slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView), ("resetSliceViews",)]
    for view in views.values():
        view.SetMappedInLayout(1)
    layout.calls.clear()
    MrmlBridge.show_results(outputs, layout)
    assert layout.calls == [("resetSliceViews",)], "a layout showing Red and Yellow stays"
    MrmlBridge.show_results(outputs)  # no layout manager (the Python console outside Slicer)


class CheckableSelector:
    """A qMRMLCheckableNodeComboBox's node list, with real MRML nodes."""

    def __init__(self, nodes):
        self.nodes, self.states = nodes, {}

    def nodeCount(self):
        return len(self.nodes)

    def nodeFromIndex(self, index):
        return self.nodes[index]

    def setCheckState(self, node, state):
        self.states[node.GetName()] = state


def test_the_checked_volumes_are_exactly_the_stored_ones(scene):
    nodes = [phantom_node(name) for name in ("a", "b", "c")]
    selector = CheckableSelector(nodes)
    set_checked_nodes(selector, [nodes[2], nodes[0]], "checked", "unchecked")
    assert selector.states == {"a": "checked", "b": "unchecked", "c": "checked"}


class Combo:
    """What select_data asks of a QComboBox."""

    def __init__(self, *values):
        self.items, self.current = [(value, value) for value in values], None

    @property
    def count(self):
        return len(self.items)

    def findData(self, value):
        return next((index for index, (_, data) in enumerate(self.items) if data == value), -1)

    def addItem(self, label, data):
        self.items.append((label, data))

    def setCurrentIndex(self, index):
        self.current = index


def test_a_saved_choice_missing_from_a_list_is_added_and_selected():
    combo = Combo("auto", "cpu")
    select_data(combo, "cpu")
    assert combo.current == 1
    select_data(combo, "cuda:1")
    assert combo.items[-1] == ("cuda:1", "cuda:1") and combo.current == 2
    select_data(combo, "")
    assert combo.current == 0
