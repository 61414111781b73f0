"""Issue 22's families, tried as a careful, slightly hostile user would: files that are not ours are never
replaced, a short write is never committed, a model file is checked before it is trusted, our own outputs
are never taken for inputs. Real processes, real files; each test fails on the engine before the fix."""
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_cli import assert_refused, ok, run_cli, run_detect, snapshot, visible

from synomaly.errors import ModelFileError
from synomaly.files.model_file import BUNDLED_DIR, load_model, model_id_of, read_metadata

DEMO = BUNDLED_DIR / "demo-phantom.safetensors"


# --- files that are not ours --------------------------------------------------------------------------

def test_a_single_run_never_replaces_a_file_it_did_not_write(phantom_case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "flair_anomaly_map.nii.gz"
    mine.write_bytes(b"the user's own file")
    before = snapshot(out)
    for extra in ((), ("--overwrite",)):
        assert_refused(run_detect(phantom_case["flair"], "-o", out, "--stages", "1", "-q", *extra),
                       "flair_anomaly_map.nii.gz", "not written by synomaly")
        assert snapshot(out) == before


def test_our_own_outputs_are_replaced_with_overwrite(phantom_case, tmp_path):
    out = tmp_path / "out"
    ok(run_detect(phantom_case["flair"], "-o", out, "--stages", "1", "-q"))
    report = json.loads((out / "flair_report.json").read_text())
    assert report["outputs"]["flair_anomaly_map.nii.gz"] == (out / "flair_anomaly_map.nii.gz").stat().st_size
    ok(run_detect(phantom_case["flair"], "-o", out, "--stages", "1", "-q", "--overwrite"))


def test_a_cohort_into_a_study_folder_keeps_the_users_summary(phantom_case, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(phantom_case["flair"].parent, study / "case")
    users = {"summary.csv": "patient,notes\np1,my notes\n", "failures.csv": "what,why\n"}
    for name, text in users.items():
        (study / name).write_text(text)
    before = snapshot(study)
    assert_refused(run_detect(study, "-o", study, "--stages", "1", "-q"), "summary.csv", "not written by synomaly")
    assert snapshot(study) == before


def test_a_csv_list_is_never_overwritten_by_the_summary(phantom_case, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    listing = out / "summary.csv"
    listing.write_text(f"image,mask\n{phantom_case['flair']},{phantom_case['brainmask']}\n")
    before = snapshot(out)
    assert_refused(run_detect(listing, "-o", out, "--stages", "1", "-q"), str(listing), "input")
    assert snapshot(out) == before


def test_an_input_named_like_another_inputs_output_is_never_overwritten(phantom_case, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    a = folder / "a.nii.gz"
    shutil.copy(phantom_case["flair"], a)
    b = folder / "a_anomaly_map.nii.gz"
    shutil.copy(phantom_case["flair"], b)
    before = snapshot(folder)
    assert_refused(run_detect(a, b, "-o", folder, "--stages", "1", "-q", "--no-skull-check"), str(b), "input")
    assert snapshot(folder) == before


def test_summary_cells_that_a_spreadsheet_would_run_are_quoted(phantom_case, tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text(f"image,mask,name\n{phantom_case['flair']},{phantom_case['brainmask']},=1+1\n")
    out = tmp_path / "out"
    ok(run_detect(listing, "-o", out, "--stages", "1", "-q"))
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[1].startswith("'=1+1,"), rows
    assert (out / "=1+1_report.json").is_file()
    ok(run_detect(listing, "-o", out, "--stages", "1", "-q"))  # read back: the same input, skipped
    assert (out / "summary.csv").read_text().splitlines() == rows[:1] + [rows[1]]


# --- our own outputs are not inputs -----------------------------------------------------------------

def test_a_rerun_with_the_outputs_inside_the_input_tree_finds_only_the_inputs(phantom_case, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(phantom_case["flair"].parent, tree / "case")
    out = tree / "results"
    first = ok(run_detect(tree, "-o", out, "--stages", "1", "-q"))
    again = ok(run_detect(tree, "-o", out, "--stages", "1", "-q"))
    assert "1 of 1 inputs" in first.stdout and "1 of 1 inputs, 0 detected, 1 skipped" in again.stdout, again.stdout
    elsewhere = tmp_path / "elsewhere"
    ok(run_detect(tree, "-o", elsewhere, "--stages", "1", "-q"))  # the old results are still not inputs
    assert len(list(elsewhere.glob("*_report.json"))) == 1, visible(elsewhere)


def test_training_never_takes_detection_outputs_for_healthy_scans(phantom_case, tmp_path):
    from synomaly.training.cases import find_cases

    folder = tmp_path / "healthy"
    folder.mkdir()
    shutil.copy(phantom_case["flair"], folder / "pat1_flair.nii.gz")
    ok(run_detect(folder / "pat1_flair.nii.gz", "-o", folder, "--stages", "1", "-q", "--no-skull-check"))
    assert (folder / "pat1_flair_anomaly_map.nii.gz").exists()
    cases = find_cases([folder])  # the folder holds one image now: a case folder, named after it
    assert len(cases) == 1 and np.array_equal(cases[0].image, sitk.GetArrayFromImage(
        sitk.ReadImage(str(phantom_case["flair"]))))


# --- what is written is what was meant ----------------------------------------------------------------

def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_short_write_is_never_committed(phantom_case, tmp_path):
    """A file-size limit behaves as a full disk or a quota: ITK's writer cuts the 250 kB anomaly map short
    without an error. The set must not appear, and the run must say why."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "synomaly", "detect", str(phantom_case["flair"]), "-o", str(out),
                             "--model", "demo-phantom", "--stages", "1", "-q"], capture_output=True, text=True,
                            env=env, timeout=300, preexec_fn=_limit_file_size)
    line = assert_refused(result, "cannot be written")
    assert "full" in line or "limit" in line
    assert not out.exists() or visible(out) == []


# --- model files are checked before they are trusted ---------------------------------------------------

def _save_model(path: Path, state, meta, keep_id: bool = False) -> Path:
    from safetensors.torch import save

    meta = dict(meta)
    if not keep_id:
        meta["model_id"] = model_id_of(state, meta)
    path.write_bytes(save(state, metadata={"synomaly": json.dumps(meta)}))
    return path


def _demo():
    from safetensors.torch import load_file

    return load_file(str(DEMO)), read_metadata(DEMO)


def test_every_bundled_model_is_its_own_id():
    for path in sorted(BUNDLED_DIR.glob("*.safetensors")):
        assert load_model(path).model_id == read_metadata(path)["model_id"]


def test_nan_weights_are_refused(tmp_path):
    import torch

    state, meta = _demo()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(ModelFileError, match="NaN or infinite weights"):
        load_model(_save_model(tmp_path / "nan.safetensors", state, meta))


def test_weights_that_are_not_the_models_id_are_refused(tmp_path, phantom_case):
    state, meta = _demo()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] * 2
    altered = _save_model(tmp_path / "demo-phantom.safetensors", state, meta, keep_id=True)
    assert_refused(run_cli("detect", phantom_case["flair"], "-o", tmp_path / "out", "--model", altered, "-q"),
                   "do not give its id", meta["model_id"])
    assert not (tmp_path / "out").exists()


BAD_DESCRIPTIONS = {
    "threshold -1": (lambda m: m.update(threshold=-1.0), "threshold"),
    "threshold NaN": (lambda m: m.update(threshold=float("nan")), "threshold"),
    "threshold infinite": (lambda m: m.update(threshold=float("inf")), "threshold"),
    "threshold missing": (lambda m: m.pop("threshold"), "threshold"),
    "threshold null": (lambda m: m.update(threshold=None), "threshold"),
    "no preprocessing": (lambda m: m.pop("preprocessing"), "preprocessing"),
    "reversed window": (lambda m: m["preprocessing"].update(intensity="window", window=[150.0, 0.0]), "window"),
    "format version abc": (lambda m: m.update(format_version="abc"), "format_version"),
    "ensemble 0": (lambda m: m["inference"].update(ensemble=0), "inference.ensemble"),
    "noise level beyond the schedule": (lambda m: m["inference"].update(noise_level=5000), "inference.noise_level"),
    "image size 0": (lambda m: m["preprocessing"].update(image_size=0), "image_size"),
    "schedule of 0 steps": (lambda m: m["schedule"].update(num_steps=0), "schedule.num_steps"),
    "a 2048-channel network": (lambda m: m["network"].update(base_channels=512), "channel"),
    "an unknown preset": (lambda m: m.update(preset="knee-mri"), "preset"),
}


@pytest.mark.parametrize("case", sorted(BAD_DESCRIPTIONS))
def test_a_bad_description_is_refused_in_one_line(case, tmp_path):
    state, meta = _demo()
    meta = json.loads(json.dumps(meta))
    change, word = BAD_DESCRIPTIONS[case]
    change(meta)
    path = _save_model(tmp_path / "bad.safetensors", state, meta, keep_id=True)
    with pytest.raises(ModelFileError, match=word) as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


def test_a_description_that_is_a_list_is_refused(tmp_path):
    from safetensors.torch import save

    state, _ = _demo()
    path = tmp_path / "list.safetensors"
    path.write_bytes(save(state, metadata={"synomaly": "[1, 2, 3]"}))
    with pytest.raises(ModelFileError, match="not a Synomaly model"):
        read_metadata(path)


def test_weights_of_another_shape_are_refused_before_the_network_is_built(tmp_path):
    """512 channels in one level stays under the description's limit; the header's shapes refuse it before
    any of the network's 100 M weights are allocated."""
    state, meta = _demo()
    meta = json.loads(json.dumps(meta))
    meta["network"].update(base_channels=512, channel_mult=[1])
    with pytest.raises(ModelFileError, match="do not match the described network"):
        load_model(_save_model(tmp_path / "wide.safetensors", state, meta, keep_id=True))


def test_a_broken_file_among_the_users_models_leaves_other_names_working(tmp_path, phantom_case):
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    state, meta = _demo()
    meta = json.loads(json.dumps(meta))
    meta["threshold"] = -1.0
    _save_model(models / "negative.safetensors", state, meta)
    env_models = dict(os.environ, SYNOMALY_MODELS_DIR=str(models), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "synomaly", "detect", str(phantom_case["flair"]), "-o",
                             str(tmp_path / "out"), "--model", "demo-phantm", "-q"], capture_output=True, text=True,
                            env=env_models, timeout=300)
    assert_refused(result, "no model named 'demo-phantm'", "demo-phantom")


def test_a_folder_given_as_the_model_is_named_so(tmp_path, phantom_case):
    assert_refused(run_cli("detect", phantom_case["flair"], "-o", tmp_path / "out", "--model", tmp_path, "-q"),
                   "is a folder")


# --- geometry -------------------------------------------------------------------------------------------

def test_a_mask_on_a_shifted_grid_is_refused(phantom_case, tmp_path):
    mask = sitk.ReadImage(str(phantom_case["brainmask"]))
    origin = np.asarray(mask.GetOrigin()) + np.asarray(mask.GetSpacing()) * [30, 0, 0]
    mask.SetOrigin(tuple(origin))
    shifted = tmp_path / "shifted_mask.nii.gz"
    sitk.WriteImage(mask, str(shifted))
    assert_refused(run_detect(phantom_case["flair"], "-o", tmp_path / "out", "--mask", shifted, "--stages", "1",
                              "-q"), "voxel grid", "30.0 mm")


@pytest.mark.parametrize("role, change, words", [
    ("brainmask", {"origin": (12.0, 0.0, 0.0)}, ("the mask", "12.0 mm away")),
    ("seg", {"spacing": (1.5, 1.5, 2.0)}, ("the label", "spacing (1.5, 1.5, 2.0) mm")),
])
def test_training_refuses_a_mask_or_label_of_the_same_size_on_another_grid(role, change, words, tmp_path):
    """Same array size, other place in space: a mask of another series, or a resampled one."""
    from synomaly.evaluation.phantom import write_phantom_case

    case = write_phantom_case(tmp_path / "healthy" / "h0", seed=3, lesion=False, shape=(32, 48, 48))
    moved = sitk.ReadImage(str(case[role]))
    moved.SetOrigin(change.get("origin", moved.GetOrigin()))
    moved.SetSpacing(change.get("spacing", moved.GetSpacing()))
    sitk.WriteImage(moved, str(case[role]))
    model = tmp_path / "m.safetensors"
    assert_refused(run_cli("train", tmp_path / "healthy", "-o", model, "--steps", "1", "-q"),
                   str(case[role]), *words, "flair.nii.gz's voxel grid", "resample")
    assert not model.exists() and not (tmp_path / "m.run").exists()


# --- inputs that claim more than they hold, and paths that lead nowhere --------------------------------

def _lying_nifti(path: Path) -> Path:
    """A 360-byte NIfTI header that claims 2000^3 float voxels, plain or gzipped."""
    import gzip
    import struct

    plain = path.with_name("small.nii")
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), str(plain))
    header = bytearray(plain.read_bytes()[:360])
    struct.pack_into("<8h", header, 40, 3, 2000, 2000, 2000, 1, 1, 1, 1)
    path.write_bytes(gzip.compress(bytes(header)) if path.name.endswith(".gz") else bytes(header))
    return path


@pytest.mark.parametrize("name", ["liar.nii", "liar.nii.gz"])
def test_a_header_claiming_more_than_its_file_is_refused_before_allocating(name, tmp_path):
    from synomaly.errors import InputError
    from synomaly.files.volume_io import read_volume

    with pytest.raises(InputError, match="truncated or damaged"):
        read_volume(_lying_nifti(tmp_path / name))


def test_a_line_of_voxels_is_refused(tmp_path):
    line = tmp_path / "line.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(50, 1, 1).astype(np.float32)), str(line))
    assert_refused(run_detect(line, "-o", tmp_path / "out", "-q"), "a line of 50 voxels")


def test_a_link_that_loops_is_refused(tmp_path):
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    assert_refused(run_detect(loop, "-o", tmp_path / "out", "-q"), "symbolic link")


# --- training: a checkpoint that cannot be written ------------------------------------------------------

def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_half_file(tmp_path):
    from synomaly.evaluation.phantom import write_phantom_case

    healthy = tmp_path / "healthy"
    for seed in range(2):
        write_phantom_case(healthy / f"case{seed}", seed=seed, lesion=False, shape=(16, 64, 64))
    model = tmp_path / "m.safetensors"
    result = subprocess.run([sys.executable, "-m", "synomaly", "train", str(healthy), "-o", str(model), "--steps", "3",
                             "--batch-size", "2", "--image-size", "32", "--base-channels", "8", "--checkpoint-every",
                             "1", "-q"], capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_refused(result, "the checkpoint cannot be written", "--resume")
    run_dir = tmp_path / "m.run"
    assert not model.exists() and not list(run_dir.glob(".tmp-*"))


# --- evaluation ---------------------------------------------------------------------------------------------

def test_an_earlier_evaluation_is_replaced_only_when_asked(phantom_case, tmp_path):
    args = ["evaluate", phantom_case["flair"].parent, "--model", "demo-phantom", "--stages", "1", "--max-slices", "4",
            "-q", "-o", tmp_path / "ev"]
    ok(run_cli(*args))
    before = snapshot(tmp_path / "ev")
    assert_refused(run_cli(*args), "earlier evaluation", "--overwrite")
    assert snapshot(tmp_path / "ev") == before
    ok(run_cli(*args, "--overwrite"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "evaluation.json").write_text('{"my": "notes"}')
    assert_refused(run_cli(*args[:-1], tmp_path / "mine", "--overwrite"), "not written by synomaly")


def test_a_soft_label_is_refused(phantom_case, tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    shutil.copy(phantom_case["flair"], case / "flair.nii.gz")
    label = sitk.ReadImage(str(phantom_case["seg"]), sitk.sitkFloat32)
    sitk.WriteImage(sitk.SmoothingRecursiveGaussian(label, 2.0), str(case / "seg.nii.gz"))
    assert_refused(run_cli("evaluate", case, "--model", "demo-phantom", "-q", "-o", tmp_path / "ev"),
                   "whole-number classes", "threshold it")
    assert not (tmp_path / "ev").exists()


# --- processes sharing a machine ----------------------------------------------------------------------------

def test_the_thread_count_follows_the_affinity_mask_slurm_and_threads():
    code = ("import os, sys\nfrom synomaly.inference.threads import cpu_share\n"
            "os.sched_setaffinity(0, {0})\nprint(cpu_share(), cpu_share(3))\n"
            "os.sched_setaffinity(0, set(range(os.cpu_count())))\nos.environ['SLURM_CPUS_PER_TASK'] = '1'\n"
            "print(cpu_share())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "3", "1"]


def test_detect_runs_with_the_threads_asked_for(phantom_case, tmp_path):
    hook = ("import sys, torch\nfrom synomaly.commands import cli\n"
            "code = cli.main(sys.argv[1:])\nprint('threads', torch.get_num_threads())\nsys.exit(code)")
    result = subprocess.run([sys.executable, "-c", hook, "detect", str(phantom_case["flair"]), "-o",
                             str(tmp_path / "out"), "--model", "demo-phantom", "--stages", "1", "-q", "--threads", "1"],
                            capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert result.returncode == 0, result.stderr
    assert "threads 1" in result.stdout


# --- grids and masks that cannot fit ------------------------------------------------------------------------

def _with_geometry(source: Path, path: Path, direction=None, spacing=None) -> Path:
    image = sitk.ReadImage(str(source))
    if direction is not None:
        image.SetDirection(direction)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_a_sheared_grid_is_refused(phantom_case, tmp_path):
    angle = np.radians(2.6)  # two axes 2.6 degrees apart: nearly collinear
    sheared = _with_geometry(phantom_case["flair"], tmp_path / "sheared.nrrd",
                             direction=(1.0, np.cos(angle), 0.0, 0.0, np.sin(angle), 0.0, 0.0, 0.0, 1.0))
    assert_refused(run_detect(sheared, "-o", tmp_path / "out", "-q"), "not at right angles", "2.6 degrees")


@pytest.mark.parametrize("spacing", [0.001, 1000.0])
def test_an_implausible_voxel_size_is_refused(spacing, phantom_case, tmp_path):
    odd = _with_geometry(phantom_case["flair"], tmp_path / "odd.nii.gz", spacing=(spacing,) * 3)
    assert_refused(run_detect(odd, "-o", tmp_path / "out", "-q"), "implausible", "millimetres")


def test_the_image_given_as_its_mask_is_refused(phantom_case, tmp_path):
    assert_refused(run_detect(phantom_case["flair"], "-o", tmp_path / "out", "--mask", phantom_case["flair"], "-q"),
                   "not a mask")


def test_a_mask_of_ones_everywhere_is_refused(phantom_case, tmp_path):
    ones = sitk.ReadImage(str(phantom_case["brainmask"]))
    ones = sitk.Cast(ones * 0 + 1, sitk.sitkUInt8)
    sitk.WriteImage(ones, str(tmp_path / "ones.nii.gz"))
    assert_refused(run_detect(phantom_case["flair"], "-o", tmp_path / "out", "--mask", tmp_path / "ones.nii.gz", "-q"),
                   "masks nothing")


def test_a_label_map_of_several_organs_is_not_a_liver_mask(phantom_case, tmp_path):
    labels = sitk.Cast(sitk.ReadImage(str(phantom_case["brainmask"])), sitk.sitkUInt8)
    labels = labels + sitk.Cast(sitk.ReadImage(str(phantom_case["seg"])) > 0, sitk.sitkUInt8) * 4
    sitk.WriteImage(labels, str(tmp_path / "body.nii.gz"))
    assert_refused(run_cli("detect", phantom_case["flair"], "-o", tmp_path / "out", "--model", "liver-ct", "--mask",
                           tmp_path / "body.nii.gz", "-q"), "liver mask holds 2 labels", "the liver alone")


def test_the_organ_mask_checks_name_its_labels_and_sort_an_accepted_mask_once(monkeypatch):
    """detect checks an organ preset's mask twice (the organ alone, then a mask at all): the refusals name the
    labels; the values of an accepted mask are sorted (np.unique, seconds on a CT) once, not in both checks."""
    from synomaly.errors import InputError
    from synomaly.inference.detection import check_organ_mask
    from synomaly.inference.preprocessing import mask_problem
    from synomaly.method.presets import PRESETS

    model = load_model("liver-ct")
    advice = f"a label map of several structures; give the liver alone (e.g. from {PRESETS['liver-ct'].mask_source})."
    mask = np.zeros((4, 32, 32), np.uint8)
    mask[1:3, 8:24, 8:24] = 1
    mask[2, 8:12, 8:12] = 5
    many = np.arange(mask.size).reshape(mask.shape) % 9
    soft = mask.astype(np.float32) / 20
    for refused, labels in ((mask, "2 labels (1, 5)"), (many, "8 labels (1, 2, 3, 4, 5, 6, ...)"),
                            (soft, "2 labels (0.05, 0.25)")):
        with pytest.raises(InputError) as error:
            check_organ_mask(refused, model)
        assert str(error.value) == f"the liver mask holds {labels}: {advice}"
    sorts, unique = [], np.unique
    monkeypatch.setattr(np, "unique", lambda values, *a, **k: sorts.append(values.size) or unique(values, *a, **k))
    liver = (mask > 0).astype(np.uint8) * 3
    check_organ_mask(liver, model)
    assert mask_problem(liver) is None
    assert sorts == [int(np.count_nonzero(liver))]


def test_the_2d_model_refuses_a_volume(phantom_case, tmp_path):
    assert_refused(run_cli("detect", phantom_case["flair"], "-o", tmp_path / "out", "--model", "carotid-us", "--mask",
                           phantom_case["brainmask"], "-q"), "carotid-us preset works on 2D images")


def test_a_nifti_whose_sform_and_qform_disagree_is_read_by_its_sform(phantom_case, tmp_path):
    """nibabel and FSL follow the sform, ITK the qform: the outputs must overlay the input in nibabel."""
    import nibabel

    source = nibabel.load(str(phantom_case["flair"]))
    moved = source.affine.copy()
    moved[:3, 3] += [30.0, 0.0, 0.0]
    image = nibabel.Nifti1Image(np.asanyarray(source.dataobj), None, source.header.copy())
    image.set_qform(source.affine, code=1)
    image.set_sform(moved, code=2)
    path = tmp_path / "scan.nii.gz"
    nibabel.save(image, str(path))
    result = ok(run_detect(path, "-o", tmp_path / "out", "--stages", "1", "-q"))
    assert "sform and qform disagree" in result.stderr
    for kind in ("anomaly_seg", "anomaly_map", "counterfactual"):
        written = nibabel.load(str(tmp_path / "out" / f"scan_{kind}.nii.gz"))
        assert np.allclose(written.affine, moved, atol=1e-3), kind


# --- headers that are read in silence ------------------------------------------------------------------------

def test_an_nrrd_without_a_patient_space_is_named(phantom_case, tmp_path):
    nrrd = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(phantom_case["flair"])), str(nrrd))
    header, _, data = nrrd.read_bytes().partition(b"\n\n")
    lines = [b"space: scanner-xyz" if line.startswith(b"space:") else line for line in header.split(b"\n")]
    nrrd.write_bytes(b"\n".join(lines) + b"\n\n" + data)
    result = ok(run_detect(nrrd, "-o", tmp_path / "out", "--stages", "1", "-q"))
    assert "NRRD space 'scanner-xyz'" in result.stderr and "left and right" in result.stderr
    report = json.loads((tmp_path / "out" / "scan_report.json").read_text())
    assert any("scanner-xyz" in w for w in report["warnings"])


def test_a_nifti_without_a_voxel_size_is_named(phantom_case, tmp_path):
    """pixdim 0 (nibabel would mend it on saving: the bytes are set here), no sform: ITK takes 1 mm."""
    import gzip
    import struct

    plain = tmp_path / "plain.nii"
    sitk.WriteImage(sitk.ReadImage(str(phantom_case["flair"])), str(plain))
    data = bytearray(plain.read_bytes())
    struct.pack_into("<3f", data, 80, 0.0, 0.0, 0.0)  # pixdim[1:4]
    struct.pack_into("<h", data, 254, 0)  # sform_code
    path = tmp_path / "nosize.nii.gz"
    path.write_bytes(gzip.compress(bytes(data)))
    from synomaly.files.volume_io import read_volume

    notes = []
    read_volume(path, notes)
    assert any("gives no voxel size" in note for note in notes), notes


def test_a_16_bit_copy_of_an_8_bit_ultrasound_image_is_refused(tmp_path, shared_data):
    image = sorted((shared_data / "carotid-us" / "images").glob("*.png"))[0]
    mask = shared_data / "carotid-us" / "lumen_masks" / image.name
    wide = tmp_path / "wide.png"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image), sitk.sitkUInt8)).astype(np.uint16) * 257
    sitk.WriteImage(sitk.GetImageFromArray(array), str(wide))
    assert_refused(run_cli("detect", wide, "--mask", mask, "--model", "carotid-us", "-o", tmp_path / "out", "-q"),
                   "grey levels up to", "divide by 257")
    ok(run_cli("detect", image, "--mask", mask, "--model", "carotid-us", "-o", tmp_path / "out8", "-q"))


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (4_000_000_000, 4_000_000_000))


def test_a_batch_that_does_not_fit_in_memory_is_one_line_and_leaves_no_run_folder(tmp_path):
    """A real allocation failure (the process's address space capped at 4 GB; 4096 slices need more)."""
    from synomaly.evaluation.phantom import write_phantom_case

    healthy = tmp_path / "healthy"
    for seed in range(2):
        write_phantom_case(healthy / f"case{seed}", seed=seed, lesion=False, shape=(16, 64, 64))
    model = tmp_path / "m.safetensors"
    args = [sys.executable, "-m", "synomaly", "train", str(healthy), "-o", str(model), "--steps", "2", "--image-size",
            "32", "--base-channels", "8", "-q"]
    result = subprocess.run(args + ["--batch-size", "4096"], capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_memory, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_refused(result, "does not fit in this machine's memory", "--batch-size")
    assert not model.exists() and not (tmp_path / "m.run").exists()


def test_runs_that_create_the_same_output_folders_at_once_all_succeed(tmp_path):
    """Shards started together on one node make the same missing parents at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    from synomaly.files.output_set import OutputFolder

    parent = tmp_path / "a" / "b" / "c"

    def enter(i):
        with OutputFolder(parent / str(i)):
            (parent / str(i) / "written").write_text("x")
        return (parent / str(i) / "written").exists()

    for _ in range(20):
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(enter, range(8)))


def test_dicom_outputs_asked_for_a_nifti_input_are_refused_not_ignored(phantom_case, tmp_path):
    assert_refused(run_detect(phantom_case["flair"], "-o", tmp_path / "out", "--dicom-outputs", "seg", "-q"),
                   "--dicom-outputs goes with DICOM inputs")
    assert not (tmp_path / "out").exists()
    ok(run_detect(phantom_case["flair"], "-o", tmp_path / "out", "--dicom-outputs", "none", "--stages", "1", "-q"))
