"""``python -m synomaly.commands.worker REQUEST.json``: one job in a process of its own, files in and out, progress
as JSON lines, a result record and an exit code; it stops on a cancel file, SIGTERM, or (when asked) the end of its
stdin pipe."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synomaly.evaluation.phantom import make_phantom
from synomaly.files.volume_io import read_volume, write_volume
from synomaly.commands.worker import EXIT_CANCELLED, EXIT_OK, EXIT_USER_ERROR, StopRequest

ROOT = Path(__file__).resolve().parents[1]


def start(folder: Path, request: dict) -> subprocess.Popen:
    (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "SynomalyEngine"))
    # stdin at its end from the start: a worker not asked to watch it must not take that for a stop request
    return subprocess.Popen([sys.executable, "-m", "synomaly.commands.worker", str(folder / "request.json")], cwd=str(folder),
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run(folder: Path, request: dict):
    process = start(folder, request)
    output, _ = process.communicate(timeout=300)
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").exists() else None
    return process.returncode, result, output


def progress_lines(folder: Path):
    path = folder / "progress.jsonl"
    return [json.loads(line)["progress"] for line in path.read_text().splitlines()] if path.exists() else []


def demo_model_available():
    from synomaly.files.model_file import DEMO_MODEL, list_models

    return any(m.name == DEMO_MODEL for m in list_models())


def phantom_input(folder: Path, name="input.nrrd"):
    phantom = make_phantom(shape=(12, 48, 48), seed=2)
    write_volume(folder / name, phantom.volume, phantom.geometry)
    return phantom


@pytest.mark.skipif(not demo_model_available(), reason="the bundled demo model is missing")
def test_a_detection_job_writes_its_outputs_on_the_input_grid(tmp_path):
    phantom = phantom_input(tmp_path)
    code, result, output = run(tmp_path, {"kind": "detection", "input": "input.nrrd", "mask": None,
                                          "model": "demo-phantom", "settings": {"device": "cpu", "ensemble": 2}})
    assert code == EXIT_OK and result["status"] == "succeeded", output
    assert set(result["outputs"]) == {"anomaly_map", "segmentation", "counterfactual", "uncertainty"}
    for kind, name in result["outputs"].items():
        array, geometry = read_volume(tmp_path / name)
        assert array.shape == phantom.volume.shape, kind
        assert geometry == phantom.geometry, kind
    assert result["report"]["model"]["name"] == "demo-phantom"
    progress = progress_lines(tmp_path)
    assert progress[0] == [0.0, "loading the model"] and progress[-1] == [1.0, "done"]


def test_an_error_is_recorded_with_its_type_and_the_exit_code_says_who_can_fix_it(tmp_path):
    code, result, output = run(tmp_path, {"kind": "detection", "input": "missing.nrrd", "model": "demo-phantom"})
    assert code == EXIT_USER_ERROR
    error = result["error"]
    assert result["status"] == "failed" and error["type"] == "InputError" and error["user_error"]
    assert "missing.nrrd" in error["message"] and not error["traceback"]

    code, result, _ = run(tmp_path, {"kind": "detection", "input": "x.nrrd", "model": "m", "settings": {"stagez": 2}})
    assert code == EXIT_USER_ERROR and "stagez" in result["error"]["message"]


def test_a_request_that_cannot_be_read_is_refused(tmp_path):
    (tmp_path / "request.json").write_text("{not json")
    run_ = subprocess.run([sys.executable, "-m", "synomaly.commands.worker", str(tmp_path / "request.json")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "SynomalyEngine")))
    assert run_.returncode == EXIT_USER_ERROR and "not a readable job request" in run_.stderr
    assert not (tmp_path / "result.json").exists()


@pytest.mark.skipif(not demo_model_available(), reason="the bundled demo model is missing")
def test_a_cancel_file_stops_the_job(tmp_path):
    phantom_input(tmp_path)
    (tmp_path / "cancel").touch()
    code, result, _ = run(tmp_path, {"kind": "detection", "input": "input.nrrd", "model": "demo-phantom",
                                     "settings": {"device": "cpu"}})
    assert code == EXIT_CANCELLED and result["status"] == "cancelled"
    assert not any((tmp_path / f"{kind}.nrrd").exists() for kind in ("anomaly_map", "segmentation"))


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGTERM")
def test_sigterm_stops_training_with_a_checkpoint(tmp_path):
    for seed in range(2):
        phantom = make_phantom(shape=(10, 48, 48), seed=seed, lesion=False)
        write_volume(tmp_path / f"case{seed}.nrrd", phantom.volume, phantom.geometry)
    settings = {"steps": 5000, "device": "cpu", "batch_size": 2, "image_size": 32, "base_channels": 8,
                "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "validation_fraction": 0.5}
    output = tmp_path / "models" / "m.safetensors"
    output.parent.mkdir()
    request = {"kind": "training", "healthy": [{"name": "a", "image": "case0.nrrd"}, str(tmp_path / "case1.nrrd")],
               "output": str(output), "settings": settings}
    process = start(tmp_path, request)
    deadline = time.monotonic() + 120
    while not any(p[0] >= 2 for p in progress_lines(tmp_path)) and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    result = json.loads((tmp_path / "result.json").read_text())
    assert process.returncode == EXIT_CANCELLED and result["status"] == "cancelled" and "resume" in result["message"]
    assert not output.exists()

    stopped_at = max(p[0] for p in progress_lines(tmp_path))
    request.update(resume=True, settings=dict(settings, steps=stopped_at + 2))
    for name in ("result.json", "progress.jsonl"):
        (tmp_path / name).unlink()
    code, result, out = run(tmp_path, request)
    assert code == EXIT_OK and Path(result["model"]) == output and output.is_file(), out
    steps = [p[0] for p in progress_lines(tmp_path) if p[2] == p[2]]
    assert steps and min(steps) > stopped_at, "the resumed run starts from the checkpoint saved on SIGTERM"


def test_the_end_of_a_watched_pipe_is_a_stop_request_and_what_comes_through_it_is_not(tmp_path):
    read_end, write_end = os.pipe()
    stop = StopRequest(tmp_path)
    thread = stop.watch(read_end)
    try:
        os.write(write_end, b"anything\n")
        assert not stop() and thread.is_alive(), "the parent's end is still open"
    finally:
        os.close(write_end)
    thread.join(timeout=60)
    assert not thread.is_alive() and stop() and stop.pipe_closed
    os.close(read_end)


def test_watching_stdin_hands_the_pipe_to_a_private_descriptor(tmp_path):
    """The worker's own child processes get the null device as stdin, not the parent's pipe."""
    code = """
import os, sys
from pathlib import Path
from synomaly.commands.worker import StopRequest
stop = StopRequest(Path(sys.argv[1]))
thread = stop.watch_stdin()
print(os.read(0, 10) == b"", flush=True)  # stdin is now the null device: at its end at once
thread.join(timeout=120)
print(stop(), flush=True)
"""
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "SynomalyEngine")))
    assert process.stdout.readline().strip() == "True"
    process.stdin.close()
    assert process.stdout.read().strip() == "True"
    assert process.wait(timeout=120) == 0
