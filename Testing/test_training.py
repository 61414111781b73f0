"""Real (tiny) training on phantoms: the loss goes down, a killed run resumes at its saved step,
calibration meets its false-positive target on healthy data, model files load safely."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from synomaly.detection import DetectionSettings, detect
from synomaly.errors import Cancelled, InputError, ModelFileError, OutputError
from synomaly.model_file import load_model, read_metadata
from synomaly.phantom import make_phantom, write_phantom_case
from synomaly.training import TrainingSettings, find_cases, recalibrate, run_dir_for, train

TINY = dict(batch_size=4, base_channels=8, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(),
            image_size=32, checkpoint_every=5, preview_every=10, device="cpu", lr=1e-3, validation_fraction=0.5)


@pytest.fixture(scope="module")
def healthy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("healthy")
    for seed in range(4):
        write_phantom_case(root / f"case{seed}", seed=seed, lesion=False, shape=(16, 64, 64))
    return root


@pytest.fixture(scope="module")
def trained(healthy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    losses = []
    train([healthy_dir], out, TrainingSettings(steps=60, **TINY),
          progress=lambda step, total, loss, msg: losses.append(loss))
    return out, losses


def test_case_discovery_reads_masks_and_labels(healthy_dir, tmp_path):
    cases = find_cases([healthy_dir])
    assert [c.name for c in cases] == ["case0", "case1", "case2", "case3"]
    assert all(c.mask is not None and c.labels is not None for c in cases)
    write_phantom_case(tmp_path / "a", seed=9)
    (tmp_path / "a" / "flair.nii.gz").rename(tmp_path / "a" / "t1.nii.gz")
    write_phantom_case(tmp_path / "b", seed=9)
    (tmp_path / "b" / "flair.nii.gz").rename(tmp_path / "a" / "flair.nii.gz")
    with pytest.raises(InputError, match="several images"):
        find_cases([tmp_path / "a"])


def test_short_training_lowers_the_loss_and_writes_a_complete_model(trained):
    path, losses = trained
    curve = [v for v in losses if np.isfinite(v)]
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5])
    meta = read_metadata(path)
    for key in ("network", "noise", "schedule", "preprocessing", "inference", "threshold", "calibration",
                "training", "model_id"):
        assert key in meta
    assert meta["noise"] == {"kind": "synomaly", "sigma": 3.0, "threshold": 175.0, "offset": 0.5, "direction": 1}
    assert meta["training"]["data"]["train_slices"] > 20
    run = run_dir_for(path)
    assert (run / "checkpoint.pt").exists() and (run / "loss.csv").exists()
    assert len(list((run / "previews").glob("*.png"))) >= 1
    model = load_model(path)
    assert all(p.dtype == torch.float32 for p in model.network.parameters())


def test_calibration_meets_its_false_positive_target(trained, healthy_dir):
    path, _ = trained
    model = load_model(path)
    target = model.metadata["calibration"]["target_fpr"]
    rates = []
    for seed in (40, 41):
        p = make_phantom(seed=seed, lesion=False, shape=(16, 64, 64))
        result = detect(p.volume, p.geometry, model, p.brain_mask,
                        DetectionSettings(device="cpu", min_component_mm3=0))
        brain = p.brain_mask > 0
        rates.append(float((result.segmentation[brain] > 0).mean()))
    # Unseen healthy volumes: near the target (calibration data are held-out slices, not these volumes).
    assert np.mean(rates) <= 3 * target
    assert model.metadata["calibration"]["voxels"] > 1000


def test_recalibration_with_a_stricter_target_raises_the_threshold(trained, healthy_dir, tmp_path):
    path, _ = trained
    out = recalibrate(path, [healthy_dir], tmp_path / "strict.safetensors", target_fpr=0.001)
    assert read_metadata(out)["threshold"] > read_metadata(path)["threshold"]


def test_cancel_saves_a_checkpoint_and_resume_continues(healthy_dir, tmp_path):
    out = tmp_path / "c.safetensors"
    steps = []

    def progress(step, total, loss, msg):
        steps.append(step)

    with pytest.raises(Cancelled):
        train([healthy_dir], out, TrainingSettings(steps=20, **TINY), progress=progress,
              cancel=lambda: len(steps) > 7)
    saved = torch.load(run_dir_for(out) / "checkpoint.pt", weights_only=True)
    assert not out.exists()
    with pytest.raises(OutputError, match="resume"):
        train([healthy_dir], out, TrainingSettings(steps=20, **TINY))
    steps.clear()
    train([healthy_dir], out, TrainingSettings(steps=20, **TINY), progress=progress, resume=True)
    trained_steps = [s for s in steps if s > 0 and s < 20]
    assert trained_steps[0] == saved["step"] + 1
    assert out.exists()


KILL_SCRIPT = """
import sys
from synomaly.training import TrainingSettings, train
train([sys.argv[1]], sys.argv[2], TrainingSettings(steps=int(sys.argv[3]), **{tiny}),
      progress=lambda s, t, l, m: print(s, flush=True), resume=len(sys.argv) > 4)
"""


def test_killed_run_resumes_at_the_saved_step(healthy_dir, tmp_path):
    out = tmp_path / "k.safetensors"
    script = KILL_SCRIPT.format(tiny=repr(TINY))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script, str(healthy_dir), str(out), "400"],
                            stdout=subprocess.PIPE, text=True, env=env)
    checkpoint = run_dir_for(out) / "checkpoint.pt"
    for line in proc.stdout:
        if int(line) >= 12 and checkpoint.exists():
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] % 5 == 0 and saved["step"] >= 5
    assert len(saved["losses"]) == saved["step"]
    result = subprocess.run([sys.executable, "-c", script, str(healthy_dir), str(out), str(saved["step"] + 3), "r"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = [int(v) for v in result.stdout.split()]
    assert [s for s in printed if s > 0][0] == saved["step"] + 1
    final = torch.load(checkpoint, weights_only=True)
    assert final["step"] == saved["step"] + 3 and final["losses"][: saved["step"]] == saved["losses"]
    assert out.exists()


def test_model_files_refuse_corrupt_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(ModelFileError, match="corrupt|not a readable"):
        load_model(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelFileError, match="not a Synomaly model"):
        load_model(foreign)
    with pytest.raises(ModelFileError, match="no model named"):
        load_model("no-such-model")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_model_weights_do_not_match_description(trained, tmp_path):
    from safetensors.torch import load_file, save

    path, _ = trained
    meta = read_metadata(path)
    meta["network"]["base_channels"] = 16
    state = load_file(str(path))
    target = tmp_path / "mismatch.safetensors"
    target.write_bytes(save(state, metadata={"synomaly": json.dumps(meta)}))
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(target)


def test_small_volumes_still_get_a_held_out_block(healthy_dir):
    from synomaly.preprocessing import PreprocessConfig
    from synomaly.training import extract_slices

    data = extract_slices(find_cases([healthy_dir]), TrainingSettings(image_size=32),
                          PreprocessConfig(image_size=32))
    held_out = [z for v in data.validation.values() for z in v]
    assert 0 < len(held_out) <= 8
    assert data.summary["train_slices"] + data.summary["validation_slices"] == data.images.shape[0] + len(held_out)
