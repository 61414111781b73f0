"""Whole-head input to a brain model is refused with a way out; skull-stripped input passes."""
import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synomaly.inference.detection import DetectionSettings, detect
from synomaly.errors import InputError
from synomaly.files.model_file import load_model
from synomaly.evaluation.phantom import make_phantom
from synomaly.inference.skullstrip import check_skull_stripped, hd_bet_brain_mask, skull_strip_features
from synomaly.files.volume_io import read_volume, write_volume

HEAD_CASES = [(head, seed, shape, spacing) for head in ("bright", "dark") for seed in range(3)
              for shape, spacing in (((32, 96, 96), (1.0, 1.0, 2.0)), ((40, 112, 112), (1.5, 1.5, 3.0)))]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "synomaly", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def whole_head(tmp_path_factory):
    """A healthy whole-head phantom (bright scalp) and its brain mask, on disk."""
    folder = tmp_path_factory.mktemp("head")
    p = make_phantom(seed=11, lesion=False, head="bright")
    write_volume(folder / "head.nii.gz", p.volume, p.geometry)
    write_volume(folder / "brainmask.nii.gz", p.brain_mask, p.geometry)
    return folder


@pytest.mark.parametrize("head,seed,shape,spacing", HEAD_CASES)
def test_phantoms_with_skull_and_scalp_are_refused(head, seed, shape, spacing):
    p = make_phantom(shape=shape, spacing=spacing, seed=seed, head=head, lesion=seed % 2 == 0)
    features = skull_strip_features(p.volume, p.geometry)
    assert not features.skull_stripped, features
    with pytest.raises(InputError, match="skull-stripped.*--mask.*--no-skull-check"):
        check_skull_stripped(p.volume, p.geometry)


@pytest.mark.parametrize("seed,shape,spacing", [(0, (32, 96, 96), (1.0, 1.0, 2.0)), (1, (16, 64, 64), (1.0, 1.0, 2.0)),
                                                (2, (40, 112, 112), (1.5, 1.5, 3.0))])
def test_skull_stripped_phantoms_pass(seed, shape, spacing):
    p = make_phantom(shape=shape, spacing=spacing, seed=seed)
    assert check_skull_stripped(p.volume, p.geometry).skull_stripped


def _real_cases(shared_data):
    with open(shared_data / "cases.csv", newline="") as f:
        return [shared_data / row["folder"] / "flair.nii.gz" for row in csv.DictReader(f)]


def test_two_real_skull_stripped_cases_pass(shared_data):
    """One z-scored (BRATS 2015) and one raw (BraTS 2018) case, quickly; all of them below."""
    for case in ("brats2015/pat0002", "brats2018/Brats18_CBICA_AVG_1"):
        path = shared_data / case / "flair.nii.gz"
        if not path.exists():
            pytest.skip(f"{path} not found; CI provides it")
        assert check_skull_stripped(*read_volume(path)).skull_stripped


@pytest.mark.slow
def test_every_real_skull_stripped_case_passes(shared_data):
    paths = _real_cases(shared_data)
    assert len(paths) >= 38
    refused = []
    for path in paths:
        features = skull_strip_features(*read_volume(path))
        if not features.skull_stripped:
            refused.append((path.parent.name, features))
    assert not refused


def test_detect_refuses_a_whole_head_and_says_how_to_proceed(whole_head, tmp_path):
    out = tmp_path / "out"
    result = run_cli("detect", whole_head / "head.nii.gz", "--model", "demo-phantom", "-o", out, "--stages", "1")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("synomaly: error:")
    for words in ("head.nii.gz", "skull-stripped", "--mask", "Slicer", "--no-skull-check", "hd-bet"):
        assert words in lines[0]
    assert not out.exists()


def test_a_brain_mask_or_the_flag_lets_a_whole_head_through(whole_head, tmp_path):
    head = whole_head / "head.nii.gz"
    masked = run_cli("detect", head, "--mask", whole_head / "brainmask.nii.gz", "--model", "demo-phantom",
                     "-o", tmp_path / "masked", "--stages", "1", "-q")
    assert masked.returncode == 0, masked.stderr
    unchecked = run_cli("detect", head, "--no-skull-check", "--model", "demo-phantom", "-o", tmp_path / "unchecked",
                        "--stages", "1", "-q")
    assert unchecked.returncode == 0, unchecked.stderr
    assert json.loads((tmp_path / "masked" / "head_report.json").read_text())["skull_check"]["result"] == "mask given"
    assert json.loads((tmp_path / "unchecked" / "head_report.json").read_text())["skull_check"]["result"] == \
        "check turned off"


def test_engine_setting_is_shared_and_the_report_records_the_check():
    model = load_model("demo-phantom")
    p = make_phantom(seed=11, lesion=False, head="dark")
    with pytest.raises(InputError, match="skull-stripped"):
        detect(p.volume, p.geometry, model, settings=DetectionSettings(device="cpu", stages=1))
    stripped = make_phantom(shape=(16, 64, 64), seed=3)
    result = detect(stripped.volume, stripped.geometry, model, settings=DetectionSettings(device="cpu", stages=1))
    check = result.report["skull_check"]
    assert check["result"] == "input looks skull-stripped" and check["constant_background"] > 0.9


def test_help_says_the_brain_model_expects_skull_stripped_flair():
    result = run_cli("detect", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "expects skull-stripped FLAIR" in text and "--no-skull-check" in text and "--skull-strip" in text


def _path_without_hd_bet():
    """PATH with this Python's folder only (no hd-bet anywhere on it), checked."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent)
    assert not (Path(sys.executable).parent / "hd-bet").exists(), "HD-BET is installed here; absence untestable"
    return env


def test_hd_bet_option_without_hd_bet_says_how_to_install_it(whole_head, tmp_path, monkeypatch):
    env = _path_without_hd_bet()
    out = tmp_path / "out"
    result = run_cli("detect", whole_head / "head.nii.gz", "--skull-strip", "hd-bet", "--model", "demo-phantom",
                     "-o", out, env=env)
    assert result.returncode == 2
    assert "HD-BET is not installed" in result.stderr and "pip install hd-bet" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    monkeypatch.setenv("PATH", env["PATH"])
    p = make_phantom(shape=(16, 64, 64), seed=1)
    with pytest.raises(InputError, match="pip install hd-bet"):
        hd_bet_brain_mask(p.volume, p.geometry)


def test_hd_bet_option_uses_what_hd_bet_writes(whole_head, tmp_path):
    """A stand-in ``hd-bet`` with HD-BET 2's command line writes the phantom's brain mask where HD-BET
    would; detect must call it that way and use the mask (the real one needs downloaded weights)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "hd-bet"
    script.write_text(
        f"#!{sys.executable}\n"
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "assert {'-i', '-o', '-device', '--save_bet_mask', '--no_bet_image'} <= set(args), args\n"
        "out = args[args.index('-o') + 1]\n"
        f"shutil.copy({str(whole_head / 'brainmask.nii.gz')!r}, out[:-len('.nii.gz')] + '_bet.nii.gz')\n"
        "print('noisy HD-BET output that must not reach the terminal')\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    result = run_cli("detect", whole_head / "head.nii.gz", "--skull-strip", "hd-bet", "--model", "demo-phantom",
                     "-o", tmp_path / "out", "--stages", "1", "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert "noisy" not in result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "head_report.json").read_text())
    assert report["skull_check"]["result"] == "brain extracted by HD-BET"
    seg, _ = read_volume(tmp_path / "out" / "head_anomaly_seg.nii.gz")
    brain, _ = read_volume(whole_head / "brainmask.nii.gz")
    assert not np.any((seg > 0) & (brain == 0))


def test_phantom_head_option_keeps_the_brain_and_adds_noisy_air():
    bright = make_phantom(seed=4, head="bright")
    dark = make_phantom(seed=4, head="dark")
    brain = bright.brain_mask > 0
    assert np.array_equal(brain, dark.brain_mask > 0)
    assert np.percentile(bright.volume[~brain], 99) > np.median(bright.volume[brain])  # bright scalp fat
    assert np.percentile(dark.volume[~brain], 99) < np.median(dark.volume[brain])      # fat-suppressed
    air = bright.volume[:, :3, :3]
    assert air.std() > 0 and air.min() >= 0  # Rician air, never a constant
    with pytest.raises(InputError, match="head"):
        make_phantom(seed=4, head="purple")
    with pytest.raises(InputError, match="too small to hold a head"):
        make_phantom(shape=(16, 40, 40), seed=4, head="bright")
