"""Real (tiny) training on phantoms: the loss goes down, a killed run resumes at its saved step,
calibration meets its false-positive target on healthy data, model files load safely."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from synomaly.inference.detection import DetectionSettings, detect
from synomaly.errors import Cancelled, InputError, ModelFileError, OutputError
from synomaly.files.model_file import load_model, read_metadata
from synomaly.evaluation.phantom import make_phantom, write_phantom_case
from synomaly.inference.runtime import cpu_has_native_bf16
from synomaly.training.calibration import recalibrate
from synomaly.training.cases import find_cases
from synomaly.training.checkpoints import run_dir_for
from synomaly.training.loop import train
from synomaly.training.settings import TrainingSettings

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
    assert meta["training"]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32"), "auto follows the CPU"
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
from synomaly import TrainingSettings, train
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
    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.training.slices import extract_slices

    data = extract_slices(find_cases([healthy_dir]), TrainingSettings(image_size=32),
                          PreprocessConfig(image_size=32))
    held_out = [z for v in data.validation.values() for z in v]
    assert 0 < len(held_out) <= 8
    assert data.summary["train_slices"] + data.summary["validation_slices"] == data.images.shape[0] + len(held_out)


# --- case discovery: every documented layout, partners paired by name --------------------------------

def _tiny_volume(path, value, shape=(4, 8, 8)):
    """A small distinct volume on disk; ``value`` identifies it after pairing."""
    from synomaly.files.geometry import Geometry
    from synomaly.files.volume_io import write_volume

    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(path, np.full(shape, value, dtype=np.float32), Geometry.identity())
    return path


def _pairs(cases):
    """name -> (image value, mask present, labels present) of discovered cases."""
    return {c.name: (float(c.image.flat[0]), c.mask is not None, c.labels is not None) for c in cases}


def test_a_folder_of_image_files_pairs_masks_and_labels_by_name(tmp_path):
    folder = tmp_path / "healthy"
    _tiny_volume(folder / "pat1_flair.nii.gz", 1)
    _tiny_volume(folder / "pat1_brainmask.nii.gz", 1)
    _tiny_volume(folder / "pat1_seg.nii.gz", 0)
    _tiny_volume(folder / "pat10_flair.nii.gz", 10)
    _tiny_volume(folder / "pat10-mask.nrrd", 1)
    _tiny_volume(folder / "pat2.nii.gz", 2)
    cases = find_cases([folder])
    assert _pairs(cases) == {"pat1_flair": (1.0, True, True), "pat10_flair": (10.0, True, False),
                             "pat2": (2.0, False, False)}
    assert not next(c for c in cases if c.name == "pat1_flair").labels.any()
    # A case folder (one image) keeps its folder's name and takes any partner, whatever its name.
    _tiny_volume(tmp_path / "cases" / "site_a" / "t2.nii.gz", 5)
    _tiny_volume(tmp_path / "cases" / "site_a" / "other_seg.nii.gz", 0)
    assert _pairs(find_cases([tmp_path / "cases"])) == {"site_a": (5.0, False, True)}


def test_listed_files_and_csv_lists_are_cases(tmp_path):
    a = _tiny_volume(tmp_path / "d" / "a_flair.nii.gz", 1)
    a_mask = _tiny_volume(tmp_path / "d" / "a_brainmask.nii.gz", 1)
    b = _tiny_volume(tmp_path / "e" / "b.nrrd", 2)
    assert _pairs(find_cases([a, a_mask, b])) == {"a_flair": (1.0, True, False), "b": (2.0, False, False)}
    assert _pairs(find_cases(str(b))) == {"b": (2.0, False, False)}
    lesion = _tiny_volume(tmp_path / "d" / "anything.nii.gz", 0)
    table = tmp_path / "lists" / "healthy.csv"
    table.parent.mkdir()
    table.write_text("Image,mask,labels,name\n../d/a_flair.nii.gz,../d/a_brainmask.nii.gz,,first\n\n"
                     f"{b},,{lesion},second\n", encoding="utf-8")
    assert _pairs(find_cases([table])) == {"first": (1.0, True, False), "second": (2.0, False, True)}


@pytest.mark.parametrize("layout, words", [
    ({"p1_flair": 1, "p1_t1": 1, "p1_mask": 1}, ["p1_mask", "several images", "p1_flair", "p1_t1"]),
    ({"p1_flair": 1, "p2_flair": 1, "brainmask": 1}, ["brainmask", "several images", "p1_flair"]),
    ({"p1_flair": 1, "p2_flair": 1, "p3_seg": 0}, ["p3_seg", "label", "p3"]),
    ({"p1_flair": 1, "p2_flair": 1, "p1_mask": 1, "p1_brainmask": 1}, ["p1_flair", "2 mask files"]),
    ({"p1_mask": 1}, ["p1_mask", "no image"]),
])
def test_ambiguous_pairing_is_refused_naming_the_files(tmp_path, layout, words):
    for name, value in layout.items():
        _tiny_volume(tmp_path / f"{name}.nii.gz", value)
    with pytest.raises(InputError) as info:
        find_cases([tmp_path])
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("img,mask\nx.nii.gz,\n", ["image", "img"]),
    ("image,msk\nx.nii.gz,\n", ["msk"]),
    ("image,mask\nmissing.nii.gz,\n", ["line 2", "missing.nii.gz", "does not exist"]),
])
def test_bad_csv_lists_are_refused(tmp_path, text, words):
    table = tmp_path / "list.csv"
    table.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as info:
        find_cases([table])
    for word in words:
        assert word in str(info.value)


# --- settings, resume and overwrite ----------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"steps": 0}, ["steps", "at least 1"]),
    ({"batch_size": 0}, ["batch size"]),
    ({"lr": float("nan")}, ["learning rate"]),
    ({"lr": -1e-3}, ["learning rate"]),
    ({"image_size": 36, "channel_mult": (1, 2, 2, 4)}, ["image size 36", "multiple of 8"]),
    ({"image_size": 34, "channel_mult": (1, 2, 2)}, ["image size 34", "multiple of 4"]),
    ({"base_channels": 9}, ["base channels 9", "group-norm", "8 or 16"]),
    ({"base_channels": 24, "channel_mult": (1, 2, 2, 4)}, ["base channels 24", "144 channels"]),
    ({"checkpoint_every": 0}, ["checkpoint interval"]),
    ({"target_fpr": 2.0}, ["target false-positive rate"]),
    ({"target_fpr": 0.0}, ["target false-positive rate"]),
    ({"steps": True}, ["steps"]),
    ({"loss": "l3"}, ["loss", "l3"]),
    ({"seed": -1}, ["seed"]),
    ({"lesion_slices": "use"}, ["lesion_slices", "use"]),
    ({"lesion_margin_mm": -1.0}, ["lesion margin"]),
    ({"precision": "fp16"}, ["precision", "fp16"]),
    ({"context_slices": -1}, ["context slices"]),
    ({"context_slices": 1, "preset": "carotid-us"}, ["context slices need volumes", "carotid-us"]),
    ({"compile": "yes"}, ["compile", "'yes'"]),
])
def test_settings_are_checked_before_any_work(tmp_path, healthy_dir, change, words):
    settings = TrainingSettings(**{**TINY, "steps": 3, **change})
    out = tmp_path / "new" / "m.safetensors"
    with pytest.raises(InputError) as info:
        train([healthy_dir], out, settings)
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "new").exists()


def _cancelled_run(healthy_dir, out, after_steps):
    steps = []
    with pytest.raises(Cancelled, match=f"step {after_steps} of"):
        train([healthy_dir], out, TrainingSettings(steps=50, **dict(TINY, checkpoint_every=100)),
              progress=lambda step, *_: steps.append(step), cancel=lambda: len(steps) > after_steps)
    return torch.load(run_dir_for(out) / "checkpoint.pt", weights_only=True)


def test_resume_accepts_changes_that_keep_the_network_and_refuses_others(healthy_dir, tmp_path):
    out = tmp_path / "r.safetensors"
    saved = _cancelled_run(healthy_dir, out, 3)
    assert saved["step"] == 3, "a cancel before the first periodic checkpoint saves the current step"
    checkpoint = run_dir_for(out) / "checkpoint.pt"
    before = checkpoint.read_bytes()
    for change, words in (({"batch_size": 2}, ["batch_size (saved 4, now 2)"]),
                          ({"lr": 1e-4, "base_channels": 16}, ["base_channels", "lr", "--overwrite"])):
        with pytest.raises(InputError) as info:
            train([healthy_dir], out, TrainingSettings(steps=50, **dict(TINY, **change)), resume=True)
        assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(InputError, match="at step 3.*at least 3"):
        train([healthy_dir], out, TrainingSettings(steps=2, **TINY), resume=True)
    assert checkpoint.read_bytes() == before and not out.exists()
    harmless = dict(TINY, checkpoint_every=2, preview_every=7, device="cpu")
    train([healthy_dir], out, TrainingSettings(steps=5, target_fpr=0.05, name="renamed", **harmless), resume=True)
    meta = read_metadata(out)
    assert meta["calibration"]["target_fpr"] == 0.05 and meta["name"] == "renamed"
    assert torch.load(checkpoint, weights_only=True)["step"] == 5


def test_a_checkpoint_of_an_older_engine_resumes_its_new_settings_at_their_defaults(healthy_dir, tmp_path):
    """A run saved before a setting existed (here context_slices, added with 2.5D input) continues after an
    upgrade; one that differs from the new setting's default is still refused."""
    out = tmp_path / "old.safetensors"
    saved = _cancelled_run(healthy_dir, out, 3)
    del saved["settings"]["context_slices"]
    torch.save(saved, run_dir_for(out) / "checkpoint.pt")
    with pytest.raises(InputError, match=r"context_slices \(saved 0, now 1\)"):
        train([healthy_dir], out, TrainingSettings(steps=5, context_slices=1, **TINY), resume=True)
    train([healthy_dir], out, TrainingSettings(steps=5, **TINY), resume=True)
    assert torch.load(run_dir_for(out) / "checkpoint.pt", weights_only=True)["step"] == 5


def test_corrupt_or_foreign_checkpoints_are_refused_without_running_code(healthy_dir, tmp_path):
    import pickle

    out = tmp_path / "c.safetensors"
    checkpoint = run_dir_for(out) / "checkpoint.pt"
    checkpoint.parent.mkdir()
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for content, words in ((os.urandom(300), "not a readable training checkpoint"),
                           (b"", "not a readable training checkpoint"),
                           (pickle.dumps({"settings": Payload()}), "not a readable training checkpoint"),
                           (None, "not a Synomaly training checkpoint")):
        if content is None:
            torch.save({"weights": torch.zeros(3), "step": 1}, checkpoint)
        else:
            checkpoint.write_bytes(content)
        with pytest.raises(InputError, match=words):
            train([healthy_dir], out, TrainingSettings(steps=5, **TINY), resume=True)
    assert not marker.exists()
    assert not out.exists()


def test_overwrite_starts_a_fresh_run(healthy_dir, tmp_path):
    out = tmp_path / "o.safetensors"
    _cancelled_run(healthy_dir, out, 4)
    stale = run_dir_for(out) / "previews" / "stale.png"
    stale.write_bytes(b"from the old run")
    with pytest.raises(InputError, match="choose one"):
        train([healthy_dir], out, TrainingSettings(steps=3, **TINY), resume=True, overwrite=True)
    train([healthy_dir], out, TrainingSettings(steps=3, **TINY), overwrite=True)
    assert not stale.exists()
    assert torch.load(run_dir_for(out) / "checkpoint.pt", weights_only=True)["step"] == 3
    with pytest.raises(OutputError, match="already exists"):
        train([healthy_dir], out, TrainingSettings(steps=3, **TINY))


def test_a_run_folder_without_checkpoint_points_to_overwrite(healthy_dir, tmp_path):
    """A run killed before its first checkpoint leaves previews only: neither plain training nor resume
    may send the user in a circle; both name --overwrite, and nothing changes."""
    out = tmp_path / "k.safetensors"
    leftover = run_dir_for(out) / "previews" / "step_000001.png"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"preview")
    with pytest.raises(OutputError, match="no checkpoint.*--overwrite"):
        train([healthy_dir], out, TrainingSettings(steps=3, **TINY))
    with pytest.raises(OutputError, match="nothing to resume.*--overwrite instead of --resume"):
        train([healthy_dir], out, TrainingSettings(steps=3, **TINY), resume=True)
    assert leftover.read_bytes() == b"preview" and not out.exists()


def _lesion_case(seed=1):
    from synomaly.training.cases import TrainingCase

    ph = make_phantom(shape=(24, 64, 64), seed=seed, lesion=True, lesion_radius_mm=12.0)
    return TrainingCase(f"lesion{seed}", ph.volume, ph.geometry, labels=ph.lesion_mask > 0)


def test_grown_lesion_reaches_the_margin_in_millimetres():
    from synomaly.training.slices import grown_lesion

    labels = np.zeros((9, 21, 21), dtype=bool)
    labels[4, 10, 10] = True
    grown = grown_lesion(labels, 4.0, (2.0, 1.0, 1.0))  # slices 2 mm apart: 2 slices either way
    assert grown[4, 10, 6] and grown[4, 10, 14] and not grown[4, 10, 5]
    assert grown[2, 10, 10] and grown[6, 10, 10] and not grown[1, 10, 10]
    assert np.array_equal(grown_lesion(labels, 0.0, (2.0, 1.0, 1.0)), labels)


def test_lesion_slices_train_with_the_grown_lesion_left_out():
    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.training.slices import extract_slices, grown_lesion

    case = _lesion_case()
    config = PreprocessConfig(image_size=32)
    skip = extract_slices([case], TrainingSettings(**TINY), config)
    mask = extract_slices([case], TrainingSettings(**TINY, lesion_slices="mask", lesion_margin_mm=3.0), config)
    assert skip.keep is None and skip.summary["lesion_slices"] == 0
    assert mask.summary["lesion_slices"] > 0
    assert mask.summary["train_slices"] == skip.summary["train_slices"] + mask.summary["lesion_slices"]
    # The same lesion-free slices are held out for calibration either way.
    assert mask.validation == skip.validation
    lesion_z = set(np.where(case.labels.any(axis=(1, 2)))[0].tolist())
    assert not lesion_z & set(mask.validation[0])
    # Left out of the loss: the grown lesion, mapped to the network's grid, and nothing of the slices without one.
    left_out = ~mask.keep
    assert left_out.any()
    assert left_out.sum() < mask.masks.sum() / 2
    healthy_rows = ~left_out.flatten(1).any(dim=1)
    assert int((~healthy_rows).sum()) >= mask.summary["lesion_slices"]  # grown into neighbouring slices too
    grown = grown_lesion(case.labels, 3.0, (1.0, 1.0, 1.0))
    assert grown.sum() > (case.labels > 0).sum()


def test_training_on_lesion_slices_runs_and_records_what_it_used(tmp_path):
    losses = []
    out = train([_lesion_case(1), _lesion_case(2)], tmp_path / "m.safetensors",
                TrainingSettings(steps=6, **TINY, lesion_slices="mask", precision="bf16"),
                progress=lambda step, total, loss, msg: losses.append(loss))
    model = load_model(out)
    saved = model.metadata["training"]
    assert saved["settings"]["lesion_slices"] == "mask" and saved["settings"]["precision"] == "bf16"
    assert saved["precision"] == "bf16", "a forced precision is the one trained in"
    assert saved["data"]["lesion_slices"] > 0
    assert np.isfinite(losses[-1])


def test_a_recalibrated_model_gets_a_new_id(trained, tmp_path):
    from synomaly.files.model_file import save_model

    model = load_model(trained[0])
    same = save_model(tmp_path / "same.safetensors", model.network, model.metadata)
    assert load_model(same).model_id == model.model_id
    model.metadata["threshold"] = model.metadata["threshold"] * 1.5
    other = save_model(tmp_path / "other.safetensors", model.network, model.metadata)
    assert load_model(other).model_id != model.model_id


def test_healthy_volume_scores_take_every_unlabelled_foreground_voxel():
    """In the input's grid, also for a volume stored in another orientation than the network's."""
    from synomaly.inference.baseline import baseline_for
    from synomaly.training.calibration import healthy_volume_scores
    from synomaly.training.cases import TrainingCase
    from synomaly.files.geometry import Geometry

    ph = make_phantom(shape=(24, 64, 64), seed=3, lesion=True)
    flipped = Geometry(ph.geometry.spacing, (0.0, 0.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0))
    case = TrainingCase("p", ph.volume, flipped, labels=ph.lesion_mask > 0)
    model = load_model("demo-phantom")
    ours, base, _ = healthy_volume_scores(model, [case], "cpu")
    result = detect(ph.volume, flipped, model, settings=DetectionSettings(device="cpu", maps_only=True))
    prepared = result.prepared
    assert prepared.orientation.flip != (False, False, False)
    healthy = prepared.orientation.invert(prepared.foreground) & ~(ph.lesion_mask > 0)
    assert ours.size == base.size == int(healthy.sum())
    np.testing.assert_allclose(np.sort(ours), np.sort(result.anomaly_map[healthy]), rtol=1e-6)
    np.testing.assert_allclose(np.sort(base), np.sort(baseline_for(prepared)[healthy]), rtol=1e-6)


def test_a_2_5d_model_sees_the_neighbouring_slices_and_detects_with_them(healthy_dir, tmp_path):
    """context_slices=1: three input channels (the slice between its neighbours), recorded in the model
    file, and detection hands each slice its neighbours: changing only the next slice changes the
    network's estimate of this one, which a 2D model would not notice."""
    out = tmp_path / "ctx.safetensors"
    train([healthy_dir], out, TrainingSettings(steps=3, context_slices=1, **TINY))
    model = load_model(str(out))
    assert model.network.config.in_channels == 3 and model.metadata["preprocessing"]["context_slices"] == 1
    assert model.metadata["training"]["settings"]["context_slices"] == 1

    from synomaly.inference.multistage import StageSettings, run_stages
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume

    phantom = make_phantom(shape=(16, 64, 64), seed=7, lesion=False)
    prepared = prepare_volume(phantom.volume, phantom.geometry,
                              PreprocessConfig.from_dict(model.metadata["preprocessing"]))
    z = prepared.slices[len(prepared.slices) // 2]
    images, masks = prepared.network_slices([z])
    assert images.shape[1] == 3 and masks.shape[1] == 1
    changed = images.clone()
    changed[:, 2] = -changed[:, 2]
    settings = StageSettings(noise_level=200, max_stages=1)
    estimates = [run_stages(model.network.eval(), schedule_of(model), x, masks, settings,
                            generator=torch.Generator().manual_seed(0)).counterfactual for x in (images, changed)]
    assert estimates[0].shape == (1, 1, 32, 32)
    assert not torch.allclose(estimates[0], estimates[1])
    result = detect(phantom.volume, phantom.geometry, model, settings=DetectionSettings(device="cpu", stages=2, ensemble=2))
    assert result.anomaly_map.shape == phantom.volume.shape and np.isfinite(result.anomaly_map).all()


def schedule_of(model):
    from synomaly.method.schedule import DiffusionSchedule

    return DiffusionSchedule(**model.metadata["schedule"])


def test_training_writes_an_input_reference(trained):
    """The calibration records the range of each input-fit feature over its volumes (``input_fit``)."""
    reference = read_metadata(trained[0])["calibration"]["input_reference"]
    assert reference["volumes"] >= 1 and reference["source"].startswith("held-out slices of")
    assert {"p05", "p95", "saturated", "region_ml", "change"} <= set(reference["features"])


def test_bias_field_augmentation_is_smooth_multiplicative_and_inside_the_mask():
    """``bias_field`` (issue 19: FLAIR without N4) multiplies half of the slices, inside the mask only, by a smooth
    field exp(s * f) with |f| <= 1 and s up to the setting; 0 leaves every slice as it was."""
    from synomaly.training.settings import TrainingSettings
    from synomaly.training.slices import augment

    x = torch.zeros(64, 1, 32, 32)
    m = torch.zeros(64, 1, 32, 32, dtype=torch.bool)
    m[:, :, 4:28, 4:28] = True
    settings = TrainingSettings(intensity_augment=0.0, flips="none", bias_field=0.6)
    y, _, _ = augment(x.clone(), m, settings, torch.Generator().manual_seed(0))
    assert torch.equal(y[~m], x[~m])
    ratio = ((y + 1) / (x + 1))[:, 0, 4:28, 4:28]
    changed = (ratio - 1).abs().amax(dim=(1, 2)) > 1e-4
    assert 16 <= int(changed.sum()) <= 48  # about half
    assert ratio.min() >= math.exp(-0.6) - 1e-5 and ratio.max() <= math.exp(0.6) + 1e-5
    assert (ratio.amax(dim=(1, 2)) / ratio.amin(dim=(1, 2))).max() > 1.5  # strong fields occur
    assert (ratio[:, 1:] - ratio[:, :-1]).abs().max() < 0.1  # smooth: no step from one pixel to the next
    same, _, _ = augment(x.clone(), m, TrainingSettings(intensity_augment=0.0, flips="none"),
                         torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    with pytest.raises(InputError, match="bias field strength"):
        TrainingSettings(bias_field=-0.1).validate()
