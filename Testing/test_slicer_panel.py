"""What the panel shows and allows, without Qt (issue 20): the run log with elapsed time and time left,
the device list from a real probe process, and Resume only where a checkpoint exists."""
import json
import sys
import time

import pytest

from test_slicer_scene import new_scene, slicer  # noqa: F401

from SynomalyDetectionLib import Parameters, SynomalyLogic
from SynomalyDetectionLib.Panel import MAX_LOG_LINES, DeviceProbe, RunLog, device_choices, memory_hint


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_run_log_keeps_each_new_message_with_its_time():
    clock = Clock()
    log = RunLog(started=clock(), clock=clock)
    log.add(0.0, "loading the model")
    clock.now += 2
    log.add(0.01, "loading the model")
    clock.now += 63
    log.add(0.5, "stage 1 of 2")
    assert log.lines == ["[0:00]  loading the model", "[1:05]  stage 1 of 2"]
    for index in range(MAX_LOG_LINES + 10):
        added = log.add(None, f"line {index}")
    assert len(log.lines) == MAX_LOG_LINES and log.lines[-1].endswith(f"line {MAX_LOG_LINES + 9}")
    assert added == log.lines[-1], "a full log still hands each new line to the panel"
    assert log.add(None, f"line {MAX_LOG_LINES + 9}") == "", "a repeated message is not logged again"


def test_time_left_follows_the_pace_so_far():
    clock = Clock()
    log = RunLog(started=clock(), clock=clock)
    clock.now += 1
    log.add(0.5, "half")
    assert log.times() == "Elapsed 0:01", "no estimate from the first second"
    clock.now += 59
    log.add(0.25, "a quarter")
    assert log.remaining_s() == pytest.approx(180) and log.times() == "Elapsed 1:00, about 3:00 left"
    clock.now += 7200
    log.add(1.0, "done")
    assert log.times() == "Elapsed 2:01:00"


def test_the_real_probe_lists_this_machines_devices():
    torch = pytest.importorskip("torch")
    probe = DeviceProbe(sys.executable)
    while probe.poll():
        time.sleep(0.05)
    assert probe.error == "" and probe.found["torch"] == torch.__version__
    assert len(probe.found["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert probe.found["mps"] == torch.backends.mps.is_available()
    values = [value for value, _ in device_choices(probe.found)]
    assert values[0] == "auto" and values[-1] == "cpu"
    assert values[1:-1] == [f"cuda:{i}" for i in range(len(probe.found["cuda"]))] + (["mps"] if probe.found["mps"]
                                                                                     else [])


def test_a_probe_without_torch_says_why(tmp_path):
    probe = DeviceProbe(sys.executable, launch=lambda args: __import__("subprocess").Popen(
        [args[0], "-S", "-I", "-c", args[2]], stdout=-1, stderr=-1, text=True))
    while probe.poll():
        time.sleep(0.05)
    assert probe.found is None and "torch" in probe.error


def test_each_gpu_is_listed_with_its_name_and_memory_and_a_small_one_gets_a_hint():
    found = json.loads('{"torch": "2.3.0", "mps": false, "cuda": ['
                       '{"index": 0, "name": "NVIDIA H100", "memory": 85899345920},'
                       '{"index": 1, "name": "NVIDIA T400", "memory": 4294967296}]}')
    assert device_choices(found) == [("auto", "auto (a CUDA GPU if there is one, else the CPU)"),
                                     ("cuda:0", "cuda:0: NVIDIA H100 (80 GB)"),
                                     ("cuda:1", "cuda:1: NVIDIA T400 (4 GB)"),
                                     ("cpu", "cpu")]
    assert memory_hint("cuda:0", found) == "" and memory_hint("cpu", found) == ""
    assert "NVIDIA T400 has 4.0 GB" in memory_hint("cuda:1", found)
    assert device_choices(None) == [("auto", "auto (a CUDA GPU if there is one, else the CPU)"), ("cpu", "cpu")]


def test_apple_mps_is_offered_where_the_probe_found_it_and_auto_still_means_cuda_or_cpu():
    found = {"torch": "2.5.0", "mps": True, "cuda": []}
    assert device_choices(found) == [("auto", "auto (a CUDA GPU if there is one, else the CPU)"),
                                     ("mps", "mps: Apple GPU (fp32)"), ("cpu", "cpu")]
    assert memory_hint("mps", found) == ""
    assert "mps" not in [value for value, _ in device_choices(dict(found, mps=False))]


def test_resume_needs_a_checkpoint_of_that_name(tmp_path):
    new_scene()
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    parameters = Parameters(training_folder=str(tmp_path), model_name="site-a")
    assert logic.training_blocker(parameters) == ""
    assert "No cancelled run of 'site-a'" in logic.training_blocker(parameters, resume=True)
    checkpoint = tmp_path / "models" / "site-a.run" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"saved")
    assert logic.training_blocker(parameters, resume=True) == ""
    assert "Choose a folder" in logic.training_blocker(Parameters(training_folder="."), resume=True)


@pytest.mark.parametrize("button, chosen", [("", ""), (".", ""), ("  ", ""), ("/data/healthy", "/data/healthy")])
def test_a_folder_button_that_holds_dot_has_no_folder_chosen(button, chosen):
    """ctkDirectoryButton's directory() is "." before a pick, while it shows Slicer's working directory."""
    parameters = Parameters(training_folder=button)
    assert parameters.chosen_folder == chosen
    assert parameters.training_source() == (chosen or [])


# the model manager: verify a file against its id, delete a model trained here


@pytest.fixture
def tiny_user_model(tmp_path):
    torch = pytest.importorskip("torch")
    from synomaly.files.model_file import save_model
    from synomaly.method.network import UNet, UNetConfig

    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    network = UNet(UNetConfig(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                              num_heads=1, image_size=16))
    from synomaly.files.model_file import BUNDLED_DIR, read_metadata

    # A whole description (a model file is checked before it is listed): the demo model's, for this network.
    meta = {k: v for k, v in read_metadata(BUNDLED_DIR / "demo-phantom.safetensors").items()
            if k in ("noise", "schedule", "preprocessing", "inference")}
    meta["preprocessing"]["image_size"] = 16
    path = save_model(tmp_path / "models" / "site-a.safetensors", network,
                      {"name": "site-a", "preset": "brain-flair", "threshold": 0.1, **meta})
    return path


def test_a_model_file_is_verified_against_its_id_without_torch_in_the_check(tiny_user_model, tmp_path):
    new_scene()
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    assert logic.verify_model(str(tiny_user_model)) == ""
    data = bytearray(tiny_user_model.read_bytes())
    data[-3] ^= 0x40  # one bit of the last weight
    tiny_user_model.write_bytes(bytes(data))
    assert "does not match its id" in logic.verify_model(str(tiny_user_model))


def test_only_a_model_trained_here_is_deleted_with_its_run_folder(tiny_user_model, tmp_path):
    new_scene()
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    run_dir = tiny_user_model.with_name("site-a.run")
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"saved")
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(tiny_user_model.read_bytes())
    from synomaly.errors import InputError

    with pytest.raises(InputError, match="Only models trained here"):
        logic.delete_model(str(elsewhere))
    assert sorted(logic.delete_model(str(tiny_user_model))) == sorted([tiny_user_model.resolve(), run_dir.resolve()])
    assert not tiny_user_model.exists() and not run_dir.exists() and elsewhere.exists()


def test_the_panel_lists_models_and_may_delete_only_those_trained_here(tiny_user_model, tmp_path):
    new_scene()
    logic = SynomalyLogic(user_models_dir=tmp_path / "models")
    entries = logic.model_choices()
    assert str(tiny_user_model) in [entry.identifier for entry in entries]
    assert logic.is_user_model(str(tiny_user_model))
    bundled = [entry.identifier for entry in entries if entry.bundled]
    assert bundled and not any(logic.is_user_model(identifier) for identifier in bundled)
    assert not logic.is_user_model("") and not logic.is_user_model(None)
    assert logic.preset_names()[0] and logic.default_model_name()
