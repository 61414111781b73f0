"""Intensity-threshold baseline: the number any FLAIR result must be reported next to.

On BraTS FLAIR a median-filtered input intensity, thresholded, reaches Dice about 0.74-0.75
(Meissen et al.; Kascenas et al. 2022). The score map is the normalised input ([-1, 1], as the
engine feeds the network) after a 3D median filter, negated for models of darker lesions (a threshold on
the darkness), or its distance from the organ's median for models of lesions either way (liver CT v2); the
segmentation is ``score > threshold``.
The threshold comes from healthy data only, with the same rule as the model's
(``calibrate_threshold``), so the comparison needs no test-set tuning.
"""
import numpy as np
from scipy import ndimage

from synomaly.errors import InputError


def baseline_score_map(normalised_volume, foreground, size: int = 5) -> np.ndarray:
    """3D median-filtered intensity inside ``foreground``; outside it the lowest inside score.

    Outside voxels get the minimum foreground score, not -inf, so that ranking metrics over any
    region stay finite and background never outranks tissue. The filter runs on the foreground's
    bounding box (with the filter's margin), which gives the same values as the whole volume.
    """
    volume = np.asarray(normalised_volume, dtype=np.float32)
    foreground = np.asarray(foreground).astype(bool, copy=False)
    if volume.ndim != 3:
        raise InputError(f"The baseline needs a 3D volume, got {volume.ndim} dimensions.")
    if foreground.shape != volume.shape:
        raise InputError(f"Foreground mask shape {foreground.shape} differs from volume shape {volume.shape}.")
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise InputError(f"Median filter size must be a positive integer (3 to 5 is usual), got {size!r}.")
    if not np.isfinite(volume).all():
        raise InputError("The volume contains NaN or infinite values; normalise it first.")
    if not foreground.any():
        raise InputError("The foreground mask is empty: there is no tissue to score.")
    size = int(size)
    margin = size // 2 + 1
    idx = np.nonzero(foreground)
    box = tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + 1 + margin, n))
                for i, n in zip(idx, volume.shape))
    # Outside the padded box the filtered values are never used; 'nearest' at the box edge only
    # matters where the box touches the volume edge, where it matches the whole-volume filter.
    filtered = ndimage.median_filter(volume[box], size=size, mode="nearest")
    inside = foreground[box]
    low = float(filtered[inside].min())
    scores = np.full(volume.shape, low, dtype=np.float32)
    scores[box][inside] = filtered[inside]
    return scores


def calibrate_threshold(healthy_scores, target_fpr: float = 0.01) -> float:
    """Threshold t with at most ``target_fpr`` of the healthy scores strictly above it.

    t is the order statistic ranked floor(target_fpr * n) + 1 from the top (an upper
    1 - target_fpr quantile taken at a data value), the lowest data value meeting the target;
    ties at t only lower the realised rate. Shared by the model and the baseline so both are
    calibrated the same way, on healthy voxels only.
    """
    values = np.asarray(healthy_scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise InputError("No healthy scores given: calibration needs healthy voxels.")
    if not np.isfinite(values).all():
        raise InputError("Healthy scores contain NaN or infinite values.")
    target_fpr = float(target_fpr)
    if not 0.0 <= target_fpr < 1.0:
        raise InputError(f"Target false-positive rate must be in [0, 1), got {target_fpr}.")
    allowed = int(np.floor(target_fpr * values.size))
    k = values.size - allowed - 1
    return float(np.partition(values, k)[k])


def calibrate_baseline_threshold(healthy_score_values, fpr: float = 0.01) -> float:
    """Baseline threshold from baseline scores of healthy voxels; see ``calibrate_threshold``."""
    return calibrate_threshold(healthy_score_values, target_fpr=fpr)


def baseline_segmentation(score_map, threshold: float, foreground=None) -> np.ndarray:
    """Binary segmentation ``score > threshold``, restricted to ``foreground`` when given."""
    seg = np.asarray(score_map) > threshold
    if foreground is not None:
        foreground = np.asarray(foreground).astype(bool, copy=False)
        if foreground.shape != seg.shape:
            raise InputError(f"Foreground mask shape {foreground.shape} differs from score map shape {seg.shape}.")
        seg &= foreground
    return seg


__all__ = ["baseline_score_map", "calibrate_threshold", "calibrate_baseline_threshold", "baseline_segmentation",
           "baseline_for", "lesion_direction"]


def lesion_direction(metadata) -> int:
    """+1 when a model's lesions are brighter than the tissue, -1 when darker; 0 for a model that scores both
    (unsigned: liver CT v2), whose baseline is two-sided too."""
    inference = metadata.get("inference") or {}
    return int(inference.get("direction", 1)) if inference.get("signed", True) else 0


def baseline_for(prepared, size: int = 5, direction: int = 1) -> np.ndarray:
    """Baseline scores in the input's grid, from the normalised volume the model saw (a PreparedVolume).

    ``direction`` -1 (lesions darker than the organ) scores the negated intensity: a threshold on the
    darkness. Outside the foreground the filter sees -1, the least anomalous score, so the organ's border
    does not look anomalous; for +1 that is the normalised volume's own background, unchanged.
    ``direction`` 0 (either way) scores the filtered intensity's distance from the foreground's own median,
    which also takes away the level a contrast phase gives the whole organ; outside, the filter sees that
    median.
    """
    if direction not in (1, -1, 0):
        raise InputError(f"The baseline's direction must be +1, -1 or 0 (both), got {direction!r}.")
    orient = prepared.orientation
    fg = orient.invert(prepared.foreground)
    if direction == 0:
        level = float(np.median(prepared.normalised[prepared.foreground])) if prepared.foreground.any() else 0.0
        centred = np.where(prepared.foreground, prepared.normalised - level, 0.0).astype(np.float32)
        scores = np.abs(baseline_score_map(orient.invert(centred), fg, size))
        scores[~fg] = scores[fg].min()  # baseline_score_map refused an empty foreground
        return scores
    signed = np.where(prepared.foreground, direction * prepared.normalised, -1.0).astype(np.float32)
    return baseline_score_map(orient.invert(signed), fg, size)
