"""PNG overview of a detection result: a few axial slices, side by side, for a quick look.

Used by the CLI (``NAME_overview.png``) and the evaluation panels. Only numpy, scikit-image and
Pillow (a scikit-image dependency): no matplotlib, so the engine's dependencies stay small.
"""
import io
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import InputError, OutputError
from .volume_io import atomic_write_bytes

GAP = 2
GAP_VALUE = 255
SEGMENTATION_RGB = (255, 0, 0)
GROUND_TRUTH_RGB = (0, 255, 0)


def _spread(indices: np.ndarray, n: int) -> List[int]:
    """``n`` entries of the sorted ``indices`` at evenly spaced ranks, ends excluded, duplicates dropped."""
    ranks = np.floor((len(indices) - 1) * (np.arange(1, n + 1) / (n + 1)) + 0.5).astype(int)
    return sorted({int(indices[r]) for r in ranks})


def choose_slices(volume: np.ndarray, segmentation: np.ndarray, n_slices: int) -> List[int]:
    """Axial (z) indices to show: spread over the segmented slices, else over the foreground.

    Every chosen slice holds some segmentation when there is any, so the contours are visible.
    Fewer than ``n_slices`` come back when fewer distinct slices are available.
    """
    seg_z = np.flatnonzero(np.any(segmentation, axis=(1, 2)))
    if seg_z.size:
        return _spread(seg_z, n_slices)
    finite = np.where(np.isfinite(volume), volume, np.nan)
    background = np.nanmin(finite) if np.isfinite(finite).any() else 0.0
    fg_z = np.flatnonzero(np.any(finite > background, axis=(1, 2)))
    if fg_z.size == 0:
        fg_z = np.arange(volume.shape[0])
    return _spread(fg_z, n_slices)


def _window(volume: np.ndarray):
    """Robust 1-99 percentile grey window over the foreground (background would drag it to 0)."""
    values = volume[np.isfinite(volume)]
    if values.size == 0:
        return 0.0, 1.0
    foreground = values[values > values.min()]
    if foreground.size:
        values = foreground
    lo, hi = np.percentile(values, [1.0, 99.0])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.clip((np.nan_to_num(image.astype(np.float64), nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    grey = np.rint(scaled * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _hot(image: np.ndarray, vmax: float) -> np.ndarray:
    """Black-red-yellow-white ramp over [0, vmax], like matplotlib's 'hot'."""
    t = np.clip(np.nan_to_num(image.astype(np.float64), nan=0.0) / vmax, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return np.rint(rgb * 255).astype(np.uint8)


def _map_max(anomaly_map: np.ndarray, map_max: Optional[float]) -> float:
    if map_max is not None:
        if not np.isfinite(map_max) or map_max <= 0:
            raise InputError(f"map_max must be a positive number, not {map_max}.")
        return float(map_max)
    values = anomaly_map[np.isfinite(anomaly_map)]
    if values.size == 0:
        return 1.0
    vmax = float(np.percentile(values, 99.9))
    if vmax <= 0:
        vmax = float(values.max())  # a small lesion can leave the 99.9th percentile at 0
    return vmax if vmax > 0 else 1.0


def _contour(rgb: np.ndarray, mask: np.ndarray, colour) -> None:
    from skimage.segmentation import find_boundaries

    rgb[find_boundaries(mask, mode="inner")] = colour


def render_overview_array(volume, counterfactual, anomaly_map, segmentation, ground_truth=None,
                          n_slices: int = 3, map_max: Optional[float] = None) -> np.ndarray:
    """The overview as an RGB uint8 array: one row per slice; columns input, counterfactual, map, contours."""
    arrays = {"volume": volume, "counterfactual": counterfactual, "anomaly_map": anomaly_map,
              "segmentation": segmentation}
    if ground_truth is not None:
        arrays["ground_truth"] = ground_truth
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    shape = arrays["volume"].shape
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"The overview needs 3D (z, y, x) arrays; the input has shape {shape}.")
    for name, arr in arrays.items():
        if arr.shape != shape:
            raise InputError(f"The overview needs arrays of one shape: {name} is {arr.shape}, "
                             f"the input {shape}.")
    if int(n_slices) < 1:
        raise InputError(f"n_slices must be at least 1, not {n_slices}.")

    volume = arrays["volume"].astype(np.float64)
    seg = arrays["segmentation"] > 0
    gt = arrays["ground_truth"] > 0 if ground_truth is not None else None
    slices = choose_slices(volume, seg, int(n_slices))
    lo, hi = _window(volume)
    vmax = _map_max(arrays["anomaly_map"], map_max)

    h, w = shape[1], shape[2]
    rows, cols = len(slices), 4
    canvas = np.full((rows * h + (rows - 1) * GAP, cols * w + (cols - 1) * GAP, 3), GAP_VALUE, dtype=np.uint8)
    for row, z in enumerate(slices):
        contours = _grey(volume[z], lo, hi)
        if gt is not None:
            _contour(contours, gt[z], GROUND_TRUTH_RGB)
        _contour(contours, seg[z], SEGMENTATION_RGB)
        panels = [_grey(volume[z], lo, hi), _grey(arrays["counterfactual"][z], lo, hi),
                  _hot(arrays["anomaly_map"][z], vmax), contours]
        top = row * (h + GAP)
        for col, panel in enumerate(panels):
            left = col * (w + GAP)
            canvas[top:top + h, left:left + w] = panel
    return canvas


def render_overview(volume, counterfactual, anomaly_map, segmentation, path, ground_truth=None,
                    n_slices: int = 3, map_max: Optional[float] = None) -> None:
    """Write the overview PNG to ``path`` atomically (no partial file is ever left behind).

    The counterfactual must be on the input's intensity scale: it shares the input's grey window.
    The map is shown over [0, map_max], map_max defaulting to the map's 99.9th percentile.
    """
    from PIL import Image

    canvas = render_overview_array(volume, counterfactual, anomaly_map, segmentation,
                                   ground_truth=ground_truth, n_slices=n_slices, map_max=map_max)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    path = Path(path)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc}).") from None
