"""Intensity baseline and the shared FPR calibration rule."""
import numpy as np
import pytest
from scipy import ndimage

from synomaly.evaluation import metrics as M
from synomaly.inference.baseline import (baseline_score_map, baseline_segmentation, calibrate_baseline_threshold,
                                         calibrate_threshold)
from synomaly.errors import InputError


def _phantom(seed=0, lesion=True):
    """Noisy 'brain' ellipsoid at -0.2 with a bright 'tumour' ball at 0.5, background -1."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:24, :40, :40]
    brain = ((z - 12) / 10.0) ** 2 + ((y - 20) / 17.0) ** 2 + ((x - 20) / 17.0) ** 2 <= 1
    tumour = brain & ((z - 12) ** 2 + (y - 16) ** 2 + (x - 24) ** 2 <= 36) & lesion
    vol = np.full(brain.shape, -1.0, np.float32)
    vol[brain] = -0.2
    vol[tumour] = 0.5
    vol += rng.normal(0, 0.25, vol.shape).astype(np.float32) * brain
    return vol, brain, tumour


def test_score_map_is_median_inside_and_min_outside():
    vol, brain, _ = _phantom()
    scores = baseline_score_map(vol, brain, size=3)
    assert scores.dtype == np.float32 and scores.shape == vol.shape
    expected = ndimage.median_filter(vol, size=3, mode="nearest")
    np.testing.assert_array_equal(scores[brain], expected[brain])
    assert np.isfinite(scores).all()
    assert np.all(scores[~brain] == scores[brain].min())


def test_score_map_cropping_matches_whole_volume_at_edges():
    rng = np.random.default_rng(1)
    vol = rng.random((10, 12, 14)).astype(np.float32)
    fg = np.zeros(vol.shape, bool)
    fg[0:4, 5:12, 0:3] = True  # touches three volume borders
    scores = baseline_score_map(vol, fg, size=5)
    np.testing.assert_array_equal(scores[fg], ndimage.median_filter(vol, size=5, mode="nearest")[fg])


def test_baseline_finds_bright_lesion():
    vol, brain, tumour = _phantom()
    healthy_vol, _, _ = _phantom(seed=5, lesion=False)
    scores = baseline_score_map(vol, brain, size=3)
    t = calibrate_baseline_threshold(baseline_score_map(healthy_vol, brain, size=3)[brain], fpr=0.01)
    seg = baseline_segmentation(scores, t, brain)
    assert M.dice(seg, tumour) > 0.75
    away = brain & ~ndimage.binary_dilation(tumour, iterations=3)  # beyond the filter's halo
    assert M.false_positive_rate(seg, tumour, away) < 0.03
    assert M.auprc(scores, tumour, brain) > 0.95
    # Filtering is what makes the baseline work on noisy data: raw intensities do worse.
    raw_t = calibrate_threshold(healthy_vol[brain], 0.01)
    assert M.dice(baseline_segmentation(vol, raw_t, brain), tumour) < M.dice(seg, tumour) - 0.03
    assert M.auprc(baseline_score_map(vol, brain, size=5), tumour, brain) > 0.95


@pytest.mark.parametrize("fpr", [0.0, 0.001, 0.01, 0.05, 0.2])
def test_calibration_meets_target_on_random_data(fpr):
    rng = np.random.default_rng(2)
    healthy = rng.normal(size=100_003)
    t = calibrate_threshold(healthy, fpr)
    rate = np.mean(healthy > t)
    assert rate <= fpr
    # Tight: the lowest data value meeting the target, so one step lower breaks it.
    assert np.mean(healthy >= t) > fpr
    # Generalises to fresh healthy data of the same distribution.
    fresh = rng.normal(size=200_000)
    assert np.mean(fresh > t) == pytest.approx(fpr, abs=max(0.1 * fpr, 5e-4))


def test_calibration_with_ties_never_exceeds_target():
    healthy = np.repeat(np.arange(10.0), 100)  # 1000 values, 100 per level
    t = calibrate_threshold(healthy, 0.05)
    assert t == 9.0 and np.mean(healthy > t) == 0.0
    t = calibrate_threshold(healthy, 0.1)
    assert t == 8.0 and np.mean(healthy > t) == pytest.approx(0.1)


def test_calibration_rejects_bad_input():
    with pytest.raises(InputError):
        calibrate_threshold(np.array([]), 0.01)
    with pytest.raises(InputError):
        calibrate_threshold(np.array([0.0, np.nan]), 0.01)
    with pytest.raises(InputError):
        calibrate_threshold(np.arange(10.0), 1.0)


def test_score_map_rejects_bad_input():
    vol, brain, _ = _phantom()
    with pytest.raises(InputError):
        baseline_score_map(vol, np.zeros_like(brain))
    with pytest.raises(InputError):
        baseline_score_map(vol, brain[:-1])
    with pytest.raises(InputError):
        baseline_score_map(vol, brain, size=0)
