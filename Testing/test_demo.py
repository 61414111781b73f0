"""The demo is the first look: on a fair phantom our segmentation has the lesion's size, and the
printout says honestly how both methods did and what each gets wrong."""
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.files.model_file import BUNDLED_DIR, DEMO_MODEL, read_metadata


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run([sys.executable, "-m", "synomaly", "demo", "-o", str(out), "-q"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_demo_segmentation_has_the_lesions_size_and_beats_the_threshold(demo):
    out, stdout = demo
    seg = _array(out / "phantom_anomaly_seg.nii.gz") > 0
    lesion = _array(out / "phantom_lesion.nii.gz") > 0
    assert 0.75 < seg.sum() / lesion.sum() < 1.4
    ours = float(re.search(r"Dice against the known lesion: ([0-9.]+)", stdout).group(1))
    baseline = float(re.search(r"intensity-threshold baseline: Dice ([0-9.]+)", stdout).group(1))
    assert ours > 0.8 and ours > baseline


def test_demo_says_what_each_method_gets_wrong(demo):
    out, stdout = demo
    lines = stdout.splitlines()
    ours = [line for line in lines if line.startswith("ours gets wrong:")]
    baseline = [line for line in lines if line.startswith("baseline gets wrong:")]
    assert len(ours) == 1 and len(baseline) == 1
    assert "mL healthy flagged" in ours[0] and "of the lesion missed" in ours[0]
    assert "periventricular caps" in baseline[0]
    sizes = re.search(r"lesion ([0-9.]+) mL; ours segments ([0-9.]+) mL, the baseline ([0-9.]+) mL", stdout)
    lesion = _array(out / "phantom_lesion.nii.gz") > 0
    assert float(sizes.group(1)) == pytest.approx(lesion.sum() * 2.0 / 1000, abs=0.01)  # 1 x 1 x 2 mm voxels
    assert np.isfinite([float(g) for g in sizes.groups()]).all()


def test_bundled_demo_model_stays_small_and_is_calibrated_on_unseen_phantoms():
    path = BUNDLED_DIR / f"{DEMO_MODEL}.safetensors"
    assert path.stat().st_size < 3_000_000
    meta = read_metadata(path)
    assert meta["preset"] == "brain-flair"
    assert meta["calibration"]["target_fpr"] == meta["calibration"]["baseline_target_fpr"] == 0.001
    assert "calibrated on" in meta["description"]
