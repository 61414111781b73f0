"""Evaluation metrics for anomaly maps and segmentations, done correctly.

The reference code tunes on the test set, computes AUPRC on an already thresholded map and
calls a row-wise distance "HD95" (see SPEC.md). Here AUPRC/AUROC use the continuous score map,
HD95 is a real surface distance in mm, and the best-threshold Dice is labelled as an oracle.

Conventions (chosen so that means over cases stay meaningful):
- Masks are compared as booleans; all arrays of one call must have the same shape.
- Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found).
- A ratio whose denominator is zero is NaN (precision without predictions, recall without
  lesion, FPR without healthy voxels, AUPRC without lesion, AUROC without one of the classes):
  aggregate such values with ``np.nanmean`` and report how many were undefined.
- HD95 is 0.0 when both masks are empty and ``inf`` when exactly one is.
- A segmentation from a score map is ``scores > threshold`` throughout the engine.
"""
from typing import Dict, NamedTuple, Sequence, Tuple

import numpy as np
from scipy import ndimage

from synomaly.errors import InputError


def _masks(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise InputError(f"Prediction shape {pred.shape} differs from ground-truth shape {gt.shape}.")
    return pred, gt


def _confusion(pred, gt) -> Tuple[int, int, int, int]:
    """(TP, FP, FN, TN) as Python ints."""
    pred, gt = _masks(pred, gt)
    tp = int(np.count_nonzero(pred & gt))
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    fp = n_pred - tp
    fn = n_gt - tp
    tn = pred.size - tp - fp - fn
    return tp, fp, fn, tn


def dice(pred, gt) -> float:
    """Dice = 2|P&G| / (|P| + |G|); 1.0 when both masks are empty."""
    tp, fp, fn, _ = _confusion(pred, gt)
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def iou(pred, gt) -> float:
    """Jaccard index |P&G| / |P|G|; 1.0 when both masks are empty."""
    tp, fp, fn, _ = _confusion(pred, gt)
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def precision(pred, gt) -> float:
    """TP / (TP + FP); NaN when nothing is predicted."""
    tp, fp, _, _ = _confusion(pred, gt)
    return float("nan") if tp + fp == 0 else tp / (tp + fp)


def recall(pred, gt) -> float:
    """TP / (TP + FN) (sensitivity); NaN when there is no lesion."""
    tp, _, fn, _ = _confusion(pred, gt)
    return float("nan") if tp + fn == 0 else tp / (tp + fn)


def false_positive_rate(pred, gt, region=None) -> float:
    """FP voxels / healthy voxels, counted inside ``region`` (e.g. the brain) when given.

    Without a region the whole array counts, so background inflates the denominator; pass the
    brain mask for a figure comparable to the calibration target. NaN when no healthy voxel.
    """
    pred, gt = _masks(pred, gt)
    if region is not None:
        region, _ = _masks(region, gt)
        pred, gt = pred[region], gt[region]
    healthy = ~gt
    n_healthy = int(np.count_nonzero(healthy))
    if n_healthy == 0:
        return float("nan")
    return int(np.count_nonzero(pred & healthy)) / n_healthy


def _split_scores(scores, gt, region) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted (ascending) scores of lesion voxels and of healthy voxels inside the region."""
    scores = np.asarray(scores)
    gt = np.asarray(gt).astype(bool, copy=False)
    if scores.shape != gt.shape:
        raise InputError(f"Score map shape {scores.shape} differs from ground-truth shape {gt.shape}.")
    if region is not None:
        region = np.asarray(region).astype(bool, copy=False)
        if region.shape != gt.shape:
            raise InputError(f"Region shape {region.shape} differs from ground-truth shape {gt.shape}.")
        scores, gt = scores[region], gt[region]
    else:
        scores, gt = scores.ravel(), gt.ravel()
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise InputError(f"Scores must be real numbers, got dtype {scores.dtype}.")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise InputError("The score map contains NaN; fill undefined voxels with a real value first.")
    return np.sort(scores[gt]), np.sort(scores[~gt])


def _positive_levels(pos: np.ndarray, neg: np.ndarray):
    """Per distinct lesion score v (descending): (v, lesion count at v, TP(v), FP(v)) for ``s >= v``."""
    values, counts = np.unique(pos, return_counts=True)
    values, counts = values[::-1], counts[::-1]
    tp = pos.size - np.searchsorted(pos, values, side="left")
    fp = neg.size - np.searchsorted(neg, values, side="left")
    return values, counts, tp, fp


def auprc(scores, gt, region=None) -> float:
    """Average precision of the continuous score map over the voxels in ``region``.

    AP = sum_k (R_k - R_{k-1}) P_k over the distinct score values, with all voxels of equal
    score entering together (ties are not broken by order). Recall only steps at lesion score
    values, so only those are evaluated. NaN when the region holds no lesion voxel.
    """
    pos, neg = _split_scores(scores, gt, region)
    if pos.size == 0:
        return float("nan")
    _, counts, tp, fp = _positive_levels(pos, neg)
    prec = tp / (tp + fp)
    return float(np.sum(counts * prec) / pos.size)


def auroc(scores, gt, region=None) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic with ties counted as one half.

    Equals the probability that a random lesion voxel scores higher than a random healthy one
    (average ranks for ties). NaN when either class is absent from the region.
    """
    pos, neg = _split_scores(scores, gt, region)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (float(pos.size) * float(neg.size)))


class OracleDice(NamedTuple):
    """Best Dice over all thresholds, chosen with the ground truth: an ORACLE, not a result.

    Report it only next to calibrated results, as the ceiling of the score map.
    ``threshold`` reproduces ``dice`` with ``scores > threshold``.
    """

    dice: float
    threshold: float


def best_threshold_dice(scores, gt, region=None) -> OracleDice:
    """Oracle: the highest Dice any threshold reaches on this case (exact, all distinct values).

    Between two consecutive lesion score values TP is constant and FP only falls as the threshold
    rises, so the optimum of ``scores >= v`` lies at a lesion score v. The returned threshold is
    the next lower score present (exact in the scores' own dtype), so ``scores > threshold``
    gives the same mask.
    Without lesion the best is the empty prediction (Dice 1.0). NaN for an empty region.
    """
    pos, neg = _split_scores(scores, gt, region)
    if pos.size + neg.size == 0:
        return OracleDice(float("nan"), float("nan"))
    if pos.size == 0:
        return OracleDice(1.0, float(neg[-1]))
    values, _, tp, fp = _positive_levels(pos, neg)
    d = 2.0 * tp / (pos.size + tp + fp)
    k = int(np.argmax(d))
    v = values[k]
    lower = []
    for arr in (pos, neg):
        i = int(np.searchsorted(arr, v, side="left"))
        if i > 0:
            lower.append(arr[i - 1])
    if lower:
        threshold = float(max(lower))
    elif np.issubdtype(pos.dtype, np.floating):
        threshold = float(np.nextafter(v, pos.dtype.type(-np.inf)))
    else:
        threshold = float(v) - 1.0
    return OracleDice(float(d[k]), threshold)


def _spacing_zyx(spacing) -> Tuple[float, float, float]:
    """Accept a Geometry or an (x, y, z) spacing, as Geometry.spacing is, and return (z, y, x)."""
    spacing = getattr(spacing, "spacing", spacing)
    s = tuple(float(v) for v in spacing)
    if len(s) != 3 or not all(np.isfinite(v) and v > 0 for v in s):
        raise InputError(f"Spacing must be three positive numbers (x, y, z) in mm, got {spacing!r}.")
    return s[2], s[1], s[0]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a 6-neighbour outside it (array borders count as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                          border_value=0)


def hd95(pred, gt, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the surfaces of two 3D masks.

    ``spacing`` is (x, y, z) in mm as ``Geometry.spacing`` gives it (a Geometry is accepted too);
    arrays are (z, y, x). The value is max(P95 of pred->gt surface distances, P95 of gt->pred),
    as in MONAI and medpy. 0.0 when both masks are empty, ``inf`` when only one is.
    """
    pred, gt = _masks(pred, gt)
    if pred.ndim != 3:
        raise InputError(f"HD95 needs 3D masks, got {pred.ndim} dimensions.")
    sampling = _spacing_zyx(spacing)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return float("inf")
    # Every surface voxel lies in the union's bounding box, so cropping to it (plus one empty voxel
    # of margin, which keeps the array border outside both masks) changes no distance.
    idx = np.nonzero(pred | gt)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    pred_c = np.pad(pred[box], 1)
    gt_c = np.pad(gt[box], 1)
    surf_p, surf_g = _surface(pred_c), _surface(gt_c)
    dist_to_g = ndimage.distance_transform_edt(~surf_g, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=sampling)
    return float(max(np.percentile(dist_to_g[surf_p], 95), np.percentile(dist_to_p[surf_g], 95)))


def slice_dice(pred, gt) -> float:
    """The paper's slice-wise Dice: mean Dice over axial slices (``array[z]``) holding lesion.

    Slices without lesion are skipped, so false positives there are invisible to this number;
    report volume Dice next to it. NaN when no slice holds lesion.
    """
    pred, gt = _masks(pred, gt)
    if pred.ndim < 2:
        raise InputError("slice_dice needs a volume indexed as array[z].")
    axes = tuple(range(1, pred.ndim))
    n_gt = np.count_nonzero(gt, axis=axes)
    keep = n_gt > 0
    if not keep.any():
        return float("nan")
    tp = np.count_nonzero(pred & gt, axis=axes)[keep]
    n_pred = np.count_nonzero(pred, axis=axes)[keep]
    return float(np.mean(2.0 * tp / (n_pred + n_gt[keep])))


def ssim_healthy_slices(volume, counterfactual, gt, foreground) -> float:
    """Mean SSIM(input, counterfactual) over axial slices with foreground and no lesion.

    Measures how much healthy anatomy the counterfactual preserves. ``data_range`` is the
    intensity range of the whole input volume, the same for every slice. NaN when no slice fits.
    """
    from skimage.metrics import structural_similarity

    volume = np.asarray(volume, dtype=np.float64)
    counterfactual = np.asarray(counterfactual, dtype=np.float64)
    gt, foreground = _masks(gt, foreground)
    if volume.shape != counterfactual.shape or volume.shape != gt.shape:
        raise InputError(f"Volume {volume.shape}, counterfactual {counterfactual.shape} and masks {gt.shape} "
                         "must have the same shape.")
    if volume.ndim != 3:
        raise InputError(f"ssim_healthy_slices needs 3D volumes, got {volume.ndim} dimensions.")
    data_range = float(volume.max() - volume.min())
    if data_range <= 0:
        raise InputError("The input volume is constant; SSIM needs an intensity range.")
    keep = np.flatnonzero(~gt.any(axis=(1, 2)) & foreground.any(axis=(1, 2)))
    if keep.size == 0:
        return float("nan")
    values = [structural_similarity(volume[z], counterfactual[z], data_range=data_range) for z in keep]
    return float(np.mean(values))


__all__ = [
    "dice", "iou", "precision", "recall", "false_positive_rate", "auprc", "auroc", "hd95",
    "slice_dice", "ssim_healthy_slices", "best_threshold_dice", "OracleDice",
]


def confusion_counts(segmentation, gt, foreground) -> Dict[str, int]:
    """Voxel counts of a segmentation against labels, and its false positives in healthy foreground: what
    ``ratios_from_counts`` turns into metrics, so that counts pooled over cases give pooled metrics."""
    seg = np.asarray(segmentation).astype(bool, copy=False)
    tp = int(np.count_nonzero(seg & gt))
    n_seg, n_gt = int(np.count_nonzero(seg)), int(np.count_nonzero(gt))
    healthy_fg = foreground & ~gt
    return {"tp": tp, "fp": n_seg - tp, "fn": n_gt - tp, "tn": seg.size - n_seg - n_gt + tp,
            "fp_foreground": int(np.count_nonzero(seg & healthy_fg)),
            "healthy_foreground": int(np.count_nonzero(healthy_fg))}


def ratios_from_counts(c: Dict[str, int]) -> Dict[str, float]:
    """Voxel-count metrics with this module's conventions (so pooling matches them)."""
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    nan = float("nan")
    return {"dice": 1.0 if 2 * tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn),
            "iou": 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn),
            "precision": nan if tp + fp == 0 else tp / (tp + fp),
            "recall": nan if tp + fn == 0 else tp / (tp + fn),
            "fpr_healthy": nan if c["healthy_foreground"] == 0 else c["fp_foreground"] / c["healthy_foreground"]}
