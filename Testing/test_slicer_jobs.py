"""The worker job as Slicer drives it (issue 20): a blocking wait that keeps the GUI alive, job files
written without SimpleITK or any redirection of Slicer's stderr, Slicer's temporary folder and the
folders a crash leaves, a progress callback that fails, a job let go at exit, and one plot redraw per
poll. ``slicer.app`` does not exist outside Slicer: where the module asks it for ``processEvents`` or
``temporaryPath``, a namespace with just those stands in for it."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import vtk

from test_slicer_detection import jobs_dir, leftover_jobs, phantom_node, tiny_model  # noqa: F401
from test_slicer_scene import new_scene, oblique_matrix, slicer

from SynomalyDetectionLib import JobRunner, Parameters, SynomalyLogic
from SynomalyDetectionLib.Engine import Engine
from SynomalyDetectionLib.JobFiles import read_nrrd_array, write_nrrd
from SynomalyDetectionLib.JobRunner import (FAILED, SUCCEEDED, WorkerError, WorkerJob, process_gone,
                                            remove_stale_job_folders)
from SynomalyDetectionLib.LossCurve import MAX_POINTS, LossCurve
from synomaly.errors import Cancelled

POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="the stand-in workers are shell scripts")


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def app(monkeypatch, tmp_path):
    """What the module asks of ``slicer.app``: an event pump that counts its calls, the temporary path and
    Slicer's home, whose bin/PythonSlicer launches this interpreter (as Slicer's launcher does its own)."""
    if os.name != "posix":
        pytest.skip("the stand-in PythonSlicer launcher is a shell script")
    home = tmp_path / "Slicer"
    (home / "bin").mkdir(parents=True)
    launcher = home / "bin" / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    launcher.chmod(0o755)
    calls = []
    stand_in = types.SimpleNamespace(processEvents=lambda: calls.append(1), temporaryPath=str(tmp_path / "slicer-tmp"),
                                     slicerHome=str(home), calls=calls)
    monkeypatch.setattr(slicer, "app", stand_in, raising=False)
    return stand_in


def shell_worker(tmp_path, body, name="worker"):
    """A stand-in interpreter: the job runs it as ``<script> -m synomaly.commands.worker request.json`` in the job folder."""
    script = tmp_path / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


# 1. a blocking wait keeps Slicer's GUI alive


def test_console_detect_processes_gui_events_while_it_waits(scene, tmp_path, tiny_model, app):
    logic = SynomalyLogic(user_models_dir=tmp_path)
    outputs = logic.detect(phantom_node(), model=str(tiny_model), device="cpu")
    assert outputs.segmentation is not None
    assert len(app.calls) > 5, "slicer.app.processEvents() runs between polls, as logProcessOutput does"
    assert not JobRunner.waiting_jobs()


@POSIX_ONLY
def test_a_job_being_waited_for_is_known_until_it_ends(tmp_path, jobs_dir):
    """The panel refuses a second run while a console wait (which processes events) runs."""
    worker = shell_worker(tmp_path, "while [ ! -f cancel ]; do sleep 0.02; done")
    job = WorkerJob(JobRunner.new_job_folder(), {"kind": "detection"}, python=worker).start()
    seen = []

    def during_wait():
        seen.append(JobRunner.waiting_jobs())
        job.cancel()

    with pytest.raises(Cancelled):
        job.wait(process_events=during_wait)
    assert seen[0] == [job] and JobRunner.waiting_jobs() == [] and not leftover_jobs(jobs_dir)


# 5. job files: uncompressed, exact for the engine, no file descriptor touched


def test_job_files_are_raw_nrrd_that_the_engine_reads_exactly(tmp_path):
    from synomaly.files.geometry import Geometry
    from synomaly.files.volume_io import read_volume

    geometry = Geometry.from_ijk_to_ras(oblique_matrix())
    for array in (np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32),
                  (np.arange(5 * 7 * 9).reshape(5, 7, 9) % 3).astype(np.uint8),
                  np.arange(-150, 165).reshape(5, 7, 9).astype(np.int16)):
        path = tmp_path / f"{array.dtype}.nrrd"
        write_nrrd(path, array, geometry)
        data = path.read_bytes()
        assert b"encoding: raw" in data and len(data) == data.index(b"\n\n") + 2 + array.nbytes
        read, read_geometry = read_volume(path)
        assert read.dtype == array.dtype and np.array_equal(read, array)
        assert np.allclose(read_geometry.ijk_to_ras(), geometry.ijk_to_ras(), atol=1e-6)
        assert np.array_equal(read_nrrd_array(path), array)


def test_the_workers_gzip_nrrd_is_read_back_without_simpleitk(tmp_path):
    from synomaly.files.geometry import Geometry
    from synomaly.files.volume_io import write_volume

    array = np.random.default_rng(1).random((4, 6, 8)).astype(np.float32)
    write_volume(tmp_path / "map.nrrd", array, Geometry.identity((0.5, 1.0, 2.0)))
    assert b"encoding: gzip" in (tmp_path / "map.nrrd").read_bytes()[:400]
    assert np.array_equal(read_nrrd_array(tmp_path / "map.nrrd"), array)


def test_a_detection_run_never_redirects_slicers_stderr(scene, tmp_path, tiny_model, monkeypatch):
    """The engine's library_messages dup2()s over fd 2; Slicer's process must not do it."""
    redirected = []
    real_dup2 = os.dup2
    monkeypatch.setattr(os, "dup2", lambda fd, fd2, *args: (redirected.append(fd2), real_dup2(fd, fd2, *args))[1])
    logic = SynomalyLogic(user_models_dir=tmp_path)
    logic.save_parameters(Parameters(input_volume=phantom_node(), model=str(tiny_model), device="cpu"))
    job = logic.start_detection(logic.parameters())
    job.wait()
    assert job.state == SUCCEEDED and redirected == []


# 8. Slicer's temporary folder; the folders a crash leaves


def test_job_folders_go_under_slicers_temporary_path(app):
    folder = JobRunner.new_job_folder()
    assert folder.parent == Path(app.temporaryPath) and folder.name.startswith(JobRunner.JOB_PREFIX)


@POSIX_ONLY
def test_stale_job_folders_are_removed_but_not_those_of_a_live_worker(tmp_path):
    root = tmp_path / "stale"
    root.mkdir()
    dead, alive, unstarted, other = (root / "synomaly-job-dead", root / "synomaly-job-alive",
                                     root / "synomaly-job-unstarted", root / "unrelated")
    for folder in (dead, alive, unstarted, other):
        folder.mkdir()
        (folder / "input.nrrd").write_bytes(b"patient data")
    finished = __import__("subprocess").Popen(["true"])
    finished.wait()
    (dead / JobRunner.PID_FILE).write_text(str(finished.pid))
    (alive / JobRunner.PID_FILE).write_text(str(os.getpid()))
    assert remove_stale_job_folders(root, min_age_s=3600) == [], "a folder just made may still be starting"
    assert sorted(remove_stale_job_folders(root, min_age_s=0)) == [dead, unstarted]
    assert alive.is_dir() and other.is_dir()


# 6. a job let go without waiting


@POSIX_ONLY
def test_a_released_training_job_stops_by_itself_and_its_folder_is_cleaned_later(tmp_path, jobs_dir):
    worker = shell_worker(tmp_path, "while [ ! -f cancel ]; do sleep 0.02; done\nsleep 0.3\necho saved > checkpoint")
    folder = JobRunner.new_job_folder()
    job = WorkerJob(folder, {"kind": "training"}, grace_s=30, python=worker).start()
    process = job._process
    job.release()
    assert job.done
    assert process.wait(timeout=20) == 0, "it ended by itself (a killed worker has a negative code)"
    assert (folder / "checkpoint").read_text().strip() == "saved"
    assert remove_stale_job_folders(jobs_dir, min_age_s=0) == [folder] and not leftover_jobs(jobs_dir)


PARENT = """
import json, sys, time
from SynomalyDetectionLib.JobRunner import WorkerJob, new_job_folder
job = WorkerJob(new_job_folder(), json.loads(sys.argv[1]), grace_s=60).start()
print(job.folder, job.pid, flush=True)
time.sleep(3600)  # never polls: a Slicer that hangs, then is killed
"""


def training_steps(folder):
    path = folder / JobRunner.PROGRESS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["progress"][0] for line in lines if line.endswith("}")]


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGKILL; on Windows the OS closes the pipe of a dead process alike")
def test_the_worker_of_a_killed_slicer_saves_its_checkpoint_and_stops(tmp_path, jobs_dir):
    """A parent process (Slicer's part) starts a real training worker through the JobRunner and is killed.
    It is not reaped until the end: its PID stays taken, as a PID can be reused or held on Windows, so only
    the pipe on the worker's stdin can tell the worker (issue 20: a crashed Slicer's worker on Windows)."""
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.files.volume_io import write_volume
    from synomaly.training.checkpoints import run_dir_for

    healthy = []
    for seed in range(2):
        phantom = make_phantom(shape=(10, 48, 48), seed=seed, lesion=False)
        healthy.append(str(tmp_path / f"case{seed}.nrrd"))
        write_volume(Path(healthy[-1]), phantom.volume, phantom.geometry)
    output = tmp_path / "models" / "m.safetensors"
    output.parent.mkdir()
    settings = {"steps": 10 ** 7, "device": "cpu", "batch_size": 2, "image_size": 32, "base_channels": 8,
                "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "validation_fraction": 0.5}
    request = {"kind": "training", "healthy": healthy, "output": str(output), "settings": settings}
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TMPDIR=str(jobs_dir), PYTHONPATH=os.pathsep.join(
        [str(root / "SynomalyDetection"), str(root / "SynomalyEngine")]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(request)], env=env, stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
    folder, pid = parent.stdout.readline().split()
    folder, pid = Path(folder), int(pid)
    try:
        deadline = time.monotonic() + 300
        while not any(step >= 2 for step in training_steps(folder)):
            assert not process_gone(pid), (folder / JobRunner.LOG_FILE).read_text()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        parent.kill()
        deadline = time.monotonic() + 300
        while not process_gone(pid):
            assert time.monotonic() < deadline, "the worker outlived its parent"
            time.sleep(0.1)
        result = json.loads((folder / JobRunner.RESULT_FILE).read_text())
        assert result["status"] == "cancelled" and "resume" in result["message"]
        assert (run_dir_for(output) / "checkpoint.pt").is_file() and not output.exists()
        assert "stdin closed" in (folder / JobRunner.LOG_FILE).read_text()
    finally:
        if not process_gone(pid):
            os.killpg(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert remove_stale_job_folders(jobs_dir, min_age_s=0) == [folder] and not folder.exists()


def test_stop_processes_gui_events_while_a_training_worker_saves_its_checkpoint(tmp_path, app):
    worker = shell_worker(tmp_path, "while [ ! -f cancel ]; do sleep 0.02; done\nsleep 0.5")
    job = WorkerJob(JobRunner.new_job_folder(), {"kind": "training"}, grace_s=30, python=worker).start()
    job.stop()
    assert app.calls, "the GUI was kept alive while waiting"
    assert job.done and process_gone(job.pid) and not list(Path(app.temporaryPath).iterdir())


# 10. an error while polling fails the job, never the caller


@POSIX_ONLY
def test_a_failing_progress_callback_fails_the_job_and_cleans_up(tmp_path, jobs_dir):
    worker = shell_worker(tmp_path, 'echo \'{"progress": [0.1, "loading"]}\' >> progress.jsonl\nsleep 60')
    folder = JobRunner.new_job_folder()
    job = WorkerJob(folder, {"kind": "detection"}, on_progress=lambda *args: 1 / 0, python=worker).start()
    while job.poll():
        time.sleep(0.02)
    assert job.state == FAILED and isinstance(job.error, ZeroDivisionError)
    assert process_gone(job.pid) and not folder.exists()
    job.stop()
    job.release()
    assert job.state == FAILED


# 12. the loss plot: one redraw per poll, a bounded number of points


def test_the_lines_of_a_poll_redraw_the_plot_once(scene, tmp_path, jobs_dir):
    curve = LossCurve(scene)
    modified = []
    curve.table.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *args: modified.append(1))
    folder = JobRunner.new_job_folder()
    lines = "".join(f'{{"progress": [{step}, 500, {1.0 / step}, "step {step}"]}}\n' for step in range(1, 501))
    (folder / JobRunner.PROGRESS_FILE).write_text(lines)
    job = WorkerJob(folder, {"kind": "unknown"}, on_progress=lambda step, total, loss, message: curve.add(step, loss),
                    after_progress=curve.flush, python=sys.executable)
    with pytest.raises(WorkerError):  # the real worker refuses the unknown kind, after the lines were drawn
        job.start().wait(interval_s=0.01)
    assert len(curve.points()) == 500 and len(modified) == 1


def test_a_long_run_keeps_a_bounded_plot_with_its_newest_points(scene):
    curve = LossCurve(scene)
    for step in range(1, 20_001):
        curve.add(step, 1.0 / step)
        if step % 100 == 0:
            curve.flush()
    steps = [step for step, _ in curve.points()]
    assert len(steps) <= MAX_POINTS and steps == sorted(steps)
    assert steps[0] == 1 and steps[-1] == 20_000 and steps[-MAX_POINTS // 4:] == list(
        range(20_001 - MAX_POINTS // 4, 20_001))


def test_training_goes_on_drawing_after_the_scene_is_closed(scene, tmp_path):
    """A scene close no longer stops a training run: its plot moves into the new scene."""
    logic = SynomalyLogic(engine=Engine(), user_models_dir=tmp_path)
    logic.loss_curve = LossCurve(scene)
    old_table = logic.loss_curve.table
    scene.Clear(0)
    curve = logic._live_loss_curve()
    curve.add(1, 0.5)
    curve.flush()
    assert curve.table is not old_table and curve.table.GetScene() is scene
    assert logic.parameters().loss_table is curve.table and curve.points() == [(1.0, 0.5)]


# several inputs in one call


def test_several_volumes_in_one_call_then_replaced_in_place(scene, tmp_path, tiny_model, jobs_dir):
    logic = SynomalyLogic(user_models_dir=tmp_path)
    nodes = [phantom_node("first"), phantom_node("second")]
    seen = []
    outputs = logic.detect_many(nodes, model=str(tiny_model), device="cpu",
                                progress=lambda fraction, message: seen.append((fraction, message)))
    assert [o.input_node for o in outputs] == nodes
    assert seen[-1][0] == pytest.approx(1.0) and seen[-1][1].startswith("[2/2] second:")
    assert all(b >= a for (a, _), (b, _) in zip(seen, seen[1:])), "one progress for the whole batch"
    ids = [[n.GetID() for n in o.nodes()] for o in outputs]
    again = logic.detect_many(nodes, model=str(tiny_model), device="cpu", replace=True)
    assert [[n.GetID() for n in o.nodes()] for o in again] == ids, "the same nodes, overwritten"
    assert not leftover_jobs(jobs_dir)


def test_a_bad_input_in_a_batch_stops_it_before_any_run(scene, tmp_path, tiny_model, jobs_dir):
    from synomaly.errors import InputError

    logic = SynomalyLogic(user_models_dir=tmp_path)
    label = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.uint8), name="labels",
                                           nodeClassName="vtkMRMLLabelMapVolumeNode")
    nodes = [phantom_node("fine"), label]
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="'labels' is a label map"):
        logic.detect_many(nodes, model=str(tiny_model), device="cpu")
    assert scene.GetNumberOfNodes() == before and not leftover_jobs(jobs_dir)


def test_a_temporary_folder_that_cannot_be_used_is_a_clear_error(scene, tmp_path, tiny_model, monkeypatch):
    from synomaly.errors import OutputError

    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "jobs"))
    logic = SynomalyLogic(user_models_dir=tmp_path)
    node = phantom_node()
    before = scene.GetNumberOfNodes()
    with pytest.raises(OutputError, match="temporary folder in Slicer's Application Settings"):
        logic.detect(node, model=str(tiny_model), device="cpu")
    assert scene.GetNumberOfNodes() == before
