"""Metrics against hand-computed values: the numbers the evaluation reports must be right."""
import math
import time

import numpy as np
import pytest

from synomaly.evaluation import metrics as M
from synomaly.errors import InputError
from synomaly.files.geometry import Geometry


def _ap_bruteforce(scores, gt):
    """Reference AP straight from the definition: one threshold per distinct value, ties together."""
    scores, gt = np.ravel(scores), np.ravel(gt).astype(bool)
    ap, prev_r = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = np.sum(pred & gt)
        r = tp / gt.sum()
        ap += (r - prev_r) * tp / pred.sum()
        prev_r = r
    return ap


def _auroc_bruteforce(scores, gt):
    scores, gt = np.ravel(scores), np.ravel(gt).astype(bool)
    pos, neg = scores[gt][:, None], scores[~gt][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def test_overlap_metrics_hand_example():
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    gt = np.array([0, 1, 1, 1, 1, 0, 0, 0], bool)
    # TP=2, FP=1, FN=2, TN=3
    assert M.dice(pred, gt) == pytest.approx(4 / 7)
    assert M.iou(pred, gt) == pytest.approx(2 / 5)
    assert M.precision(pred, gt) == pytest.approx(2 / 3)
    assert M.recall(pred, gt) == pytest.approx(2 / 4)
    assert M.false_positive_rate(pred, gt) == pytest.approx(1 / 4)
    region = np.array([0, 1, 1, 1, 1, 1, 1, 0], bool)  # excludes the FP voxel and one TN
    assert M.false_positive_rate(pred, gt, region) == 0.0
    region[0] = True
    assert M.false_positive_rate(pred, gt, region) == pytest.approx(1 / 3)


def test_perfect_and_empty_conventions():
    gt = np.zeros((4, 5, 6), bool)
    gt[1:3, 1:4, 2:5] = True
    assert M.dice(gt, gt) == 1.0 and M.iou(gt, gt) == 1.0
    empty = np.zeros_like(gt)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(empty, gt) == 0.0
    assert math.isnan(M.precision(empty, gt))
    assert math.isnan(M.recall(gt, empty))
    assert math.isnan(M.false_positive_rate(gt, np.ones_like(gt)))
    with pytest.raises(InputError):
        M.dice(gt, gt[:-1])


def test_auprc_perfect_and_hand_example_with_ties():
    gt = np.array([0, 0, 1, 1, 0, 1], bool)
    assert M.auprc(gt.astype(float), gt) == 1.0
    assert M.auroc(gt.astype(float), gt) == 1.0
    # Scores high->low: 0.9 {P}, 0.8 {P, N} (tie), 0.5 {N}, 0.3 {P, N} (tie).
    scores = np.array([0.8, 0.5, 0.9, 0.8, 0.3, 0.3])
    gt = np.array([0, 0, 1, 1, 0, 1], bool)
    # t=0.9: TP1 FP0 P=1 R=1/3; t=0.8: TP2 FP1 P=2/3 R=2/3; t=0.5: no recall step;
    # t=0.3: TP3 FP3 P=1/2 R=1.  AP = 1/3*1 + 1/3*2/3 + 1/3*1/2 = 13/18.
    assert M.auprc(scores, gt) == pytest.approx(13 / 18)
    # Breaking the tie lesion-first (optimistic) would give (1 + 1 + 3/5) / 3 instead.
    assert M.auprc(scores, gt) != pytest.approx((1 + 1 + 3 / 5) / 3)
    # AUROC: pos 0.9 beats 3 neg; pos 0.8 beats 2, ties 1; pos 0.3 beats 0, ties 1 -> (3+2.5+0.5)/9.
    assert M.auroc(scores, gt) == pytest.approx(6 / 9)


def test_ranking_metrics_match_bruteforce_and_respect_region():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 12, size=(6, 7, 8)).astype(np.float32)  # many ties
    gt = rng.random((6, 7, 8)) < 0.3
    region = rng.random((6, 7, 8)) < 0.7
    assert M.auprc(scores, gt) == pytest.approx(_ap_bruteforce(scores, gt))
    assert M.auroc(scores, gt) == pytest.approx(_auroc_bruteforce(scores, gt))
    assert M.auprc(scores, gt, region) == pytest.approx(_ap_bruteforce(scores[region], gt[region]))
    assert M.auroc(scores, gt, region) == pytest.approx(_auroc_bruteforce(scores[region], gt[region]))
    assert M.auprc(scores, gt, region) != pytest.approx(M.auprc(scores, gt))


def test_ranking_metrics_undefined_and_bad_input():
    gt = np.zeros(10, bool)
    assert math.isnan(M.auprc(np.arange(10.0), gt))
    assert math.isnan(M.auroc(np.arange(10.0), gt))
    assert math.isnan(M.auroc(np.arange(10.0), ~gt))
    with pytest.raises(InputError):
        M.auprc(np.array([0.1, np.nan]), np.array([1, 0], bool))


def test_random_scores_auroc_half_and_auprc_prevalence_and_speed():
    rng = np.random.default_rng(1)
    n = 9_000_000
    scores = rng.random(n, dtype=np.float32)
    gt = rng.random(n) < 0.02
    t0 = time.perf_counter()
    a = M.auroc(scores, gt)
    p = M.auprc(scores, gt)
    elapsed = time.perf_counter() - t0
    assert a == pytest.approx(0.5, abs=0.005)
    assert p == pytest.approx(0.02, abs=0.002)
    assert elapsed < 20.0  # a few seconds on one core; generous for a shared machine


def test_best_threshold_dice_oracle():
    scores = np.array([0.8, 0.5, 0.9, 0.8, 0.3, 0.3], np.float32)
    gt = np.array([0, 0, 1, 1, 0, 1], bool)
    # Candidates: >=0.9 Dice 2/4; >=0.8 Dice 4/6; >=0.3 Dice 6/9. Best 2/3 at 0.8 (first reached).
    res = M.best_threshold_dice(scores, gt)
    assert isinstance(res, M.OracleDice)
    assert res.dice == pytest.approx(2 / 3)
    assert M.dice(scores > res.threshold, gt) == pytest.approx(res.dice)


def test_best_threshold_dice_matches_exhaustive_search():
    rng = np.random.default_rng(2)
    gt = np.zeros((8, 16, 16), bool)
    gt[2:6, 4:10, 5:12] = True
    scores = (gt * 0.6 + rng.normal(0, 0.3, gt.shape)).astype(np.float32)
    region = np.ones_like(gt)
    region[:, :2] = False
    best = max(M.dice((scores > t) & region, gt & region) for t in np.concatenate([[-np.inf], np.unique(scores)]))
    res = M.best_threshold_dice(scores, gt, region)
    assert res.dice == pytest.approx(best)
    assert M.dice((scores > res.threshold)[region], gt[region]) == pytest.approx(res.dice)
    # No lesion: best is predicting nothing.
    res0 = M.best_threshold_dice(scores, np.zeros_like(gt))
    assert res0.dice == 1.0 and not (scores > res0.threshold).any()
    # Lesion holds the lowest score: the threshold must still sit below it.
    s = np.array([0.0, 1.0, 2.0], np.float32)
    r = M.best_threshold_dice(s, np.array([1, 1, 1], bool))
    assert r.dice == 1.0 and (s > r.threshold).all()


def _sphere(shape, center_mm, radius_mm, spacing_zyx):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d2 = sum(((g * s) - c) ** 2 for g, s, c in zip(grids, spacing_zyx, center_mm))
    return d2 <= radius_mm ** 2


def test_hd95_identity_and_empty():
    m = _sphere((20, 20, 20), (10, 10, 10), 6, (1, 1, 1))
    assert M.hd95(m, m, (1.0, 1.0, 1.0)) == 0.0
    empty = np.zeros_like(m)
    assert M.hd95(empty, empty, (1, 1, 1)) == 0.0
    assert M.hd95(m, empty, (1, 1, 1)) == math.inf
    assert M.hd95(empty, m, (1, 1, 1)) == math.inf
    with pytest.raises(InputError):
        M.hd95(m, m, (1.0, 0.0, 1.0))


def test_hd95_uses_xyz_spacing_order():
    a = np.zeros((12, 10, 10), bool)
    b = np.zeros_like(a)
    a[3] = True
    b[5] = True  # two full axial planes, 2 voxels apart along z
    # Geometry.spacing is (x, y, z): z spacing 3 mm -> 6 mm; the reversed order would give 1 mm.
    assert M.hd95(a, b, (0.5, 0.5, 3.0)) == pytest.approx(6.0)
    assert M.hd95(a, b, Geometry.identity((0.5, 0.5, 3.0))) == pytest.approx(6.0)


def test_hd95_concentric_spheres_anisotropic():
    spacing_xyz = (0.7, 1.0, 2.0)
    spacing_zyx = spacing_xyz[::-1]
    shape = (40, 70, 100)
    center = (40.0, 35.0, 35.0)
    r, d = 12.0, 5.0
    inner = _sphere(shape, center, r, spacing_zyx)
    outer = _sphere(shape, center, r + d, spacing_zyx)
    value = M.hd95(inner, outer, spacing_xyz)
    # Surface voxelisation blurs each surface by up to about half the coarsest spacing.
    assert value == pytest.approx(d, abs=1.5)
    assert M.hd95(outer, inner, spacing_xyz) == pytest.approx(value)
    # A sphere shifted by d along x: the far caps are d apart.
    shifted = _sphere(shape, (center[0], center[1], center[2] + d), r, spacing_zyx)
    shift_value = M.hd95(inner, shifted, spacing_xyz)
    assert 0.5 * d < shift_value <= d + 1.0


def test_slice_dice_differs_from_volume_dice():
    gt = np.zeros((3, 4, 4), bool)
    pred = np.zeros_like(gt)
    gt[0, :2, :2] = True          # 4 voxels, found exactly
    pred[0, :2, :2] = True
    gt[1, :, :] = True            # 16 voxels, half found
    pred[1, :2, :] = True
    pred[2, :, :] = True          # 16 false positives on a lesion-free slice
    # Slice Dice: slice 0 -> 1, slice 1 -> 2*8/(8+16) = 2/3; mean 5/6. Slice 2 is ignored.
    assert M.slice_dice(pred, gt) == pytest.approx(5 / 6)
    # Volume Dice: TP 12, |P| 28, |G| 20 -> 24/48.
    assert M.dice(pred, gt) == pytest.approx(0.5)
    assert math.isnan(M.slice_dice(pred, np.zeros_like(gt)))


def test_ssim_healthy_slices():
    rng = np.random.default_rng(3)
    vol = rng.random((5, 32, 32)).astype(np.float32)
    gt = np.zeros(vol.shape, bool)
    gt[2, 10:20, 10:20] = True
    fg = np.zeros(vol.shape, bool)
    fg[1:4] = True                 # slices 1, 2, 3 have foreground; 2 has lesion
    cf = vol.copy()
    cf[2] = 0.0                    # lesion slice badly changed: must not count
    assert M.ssim_healthy_slices(vol, cf, gt, fg) == pytest.approx(1.0)
    cf[3] = rng.random((32, 32))   # a healthy slice replaced by noise lowers the mean
    value = M.ssim_healthy_slices(vol, cf, gt, fg)
    assert 0.3 < value < 0.7
    assert math.isnan(M.ssim_healthy_slices(vol, cf, np.ones_like(gt), fg))
