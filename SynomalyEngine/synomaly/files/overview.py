"""PNG overview of a detection result: a few labelled axial slices, side by side, for a quick look.

Rows are axial slices in radiological display (the patient's right on the image's left, anterior up),
whatever the storage orientation: the geometry's direction matrix decides, as for the network's input.
A 2D image (one slice) is shown as stored, without side markers.
Pixels are square in millimetres. Columns: input, counterfactual, anomaly map (with a colour bar) and
the input with contours (ours red, ground truth green, with a legend); R and L mark the sides.

Used by the CLI (``NAME_overview.png``) and the evaluation panels. Only numpy, scikit-image and
Pillow (a scikit-image dependency): no matplotlib, so the engine's dependencies stay small.
"""
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from synomaly.errors import InputError, OutputError
from synomaly.files.geometry import Geometry
from synomaly.files.volume_io import atomic_write_bytes

COLUMNS = ("input", "counterfactual", "anomaly map", "contours")
SEGMENTATION_RGB = (255, 0, 0)
GROUND_TRUTH_RGB = (0, 255, 0)
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
GAP = 4            # between panels
MIN_PANEL = 160    # the narrowest a panel is drawn (pixels), so that titles and legends fit
MARGIN = 18        # left and right of the panels, for the R and L markers
TITLE_HEIGHT = 20
FOOTER_HEIGHT = 52
FONT_SIZE = 13

Box = Tuple[int, int, int, int]  # top, left, bottom, right (exclusive), in image pixels


@dataclass
class Overview:
    """The picture and where everything in it is, so that callers and tests need not guess."""

    image: np.ndarray                                         # RGB uint8
    slices: List[int]                                         # axial indices shown, inferior to superior
    panels: Dict[Tuple[int, str], Box] = field(default_factory=dict)  # (row, column title) -> box
    labels: Dict[str, Box] = field(default_factory=dict)      # titles, "R", "L", "colour bar", legend entries
    map_max: float = 1.0


def _spread(indices: np.ndarray, n: int) -> List[int]:
    """``n`` entries of the sorted ``indices`` at evenly spaced ranks, ends excluded, duplicates dropped."""
    ranks = np.floor((len(indices) - 1) * (np.arange(1, n + 1) / (n + 1)) + 0.5).astype(int)
    return sorted({int(indices[r]) for r in ranks})


def _finite_values(volume: np.ndarray) -> np.ndarray:
    """The volume's finite values, flat, in its own type (a big volume is never copied to float64)."""
    flat = volume.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        flat = flat[np.isfinite(flat)]
    return flat


def _background(values: np.ndarray) -> float:
    """The 1st percentile, not the minimum: one extreme voxel must not decide what is background."""
    from synomaly.files.volume_io import background_level

    return background_level(values) if values.size else 0.0


def choose_slices(volume: np.ndarray, segmentation: np.ndarray, n_slices: int,
                  background: Optional[float] = None) -> List[int]:
    """Axial (z) indices to show: spread over the segmented slices, else over the foreground (above
    ``background``, by default the volume's own).

    Every chosen slice holds some segmentation when there is any, so the contours are visible.
    Fewer than ``n_slices`` come back when fewer distinct slices are available.
    """
    # Slice by slice: no full-size masks of a large volume.
    seg_z = np.flatnonzero([np.any(plane > 0) for plane in segmentation])
    if seg_z.size:
        return _spread(seg_z, n_slices)
    if background is None:
        background = _background(_finite_values(volume))
    fg_z = np.flatnonzero([np.any(plane > background) for plane in volume])  # NaN is never above it
    if fg_z.size == 0:
        fg_z = np.arange(volume.shape[0])
    return _spread(fg_z, n_slices)


def _grey_levels(volume: np.ndarray, axial: np.ndarray):
    """The background (``_background`` of the reoriented ``axial``) and the grey window (``_window``) of a
    volume without NaN, from its own array: percentiles do not depend on the voxels' order, and the
    background's sample is taken from the reoriented view without a copy of it."""
    from synomaly.files.volume_io import background_level

    volume = np.asarray(volume)
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():  # rare: the finite values, copied
        values = _finite_values(axial)
        background = _background(values)
        return background, _window(values, background)
    background = background_level(axial) if axial.size else 0.0
    return background, _window(volume, background)


def _window(values: np.ndarray, background: float):
    """Robust 1-99 percentile grey window over the foreground (background would drag it to 0)."""
    if values.size == 0:
        return 0.0, 1.0
    foreground = values[values > background]
    if foreground.size:
        values = foreground
    lo, hi = np.percentile(values.astype(np.float64, copy=False), [1.0, 99.0])
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


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font only
        return ImageFont.load_default()


def _resize(plane: np.ndarray, size_hw: Tuple[int, int], nearest: bool) -> np.ndarray:
    """A 2D slice at display size: bilinear for intensities, nearest for masks."""
    from PIL import Image

    if plane.shape == tuple(size_hw):
        return plane
    mode = Image.NEAREST if nearest else Image.BILINEAR
    image = Image.fromarray(plane.astype(np.uint8 if nearest else np.float32), "L" if nearest else "F")
    return np.asarray(image.resize((size_hw[1], size_hw[0]), mode))


def _display_size(shape_hw, spacing_yx) -> Tuple[int, int]:
    """Square millimetre pixels, at least MIN_PANEL wide."""
    h_mm, w_mm = shape_hw[0] * spacing_yx[0], shape_hw[1] * spacing_yx[1]
    pixel_mm = min(spacing_yx)
    zoom = max(1.0, MIN_PANEL / (w_mm / pixel_mm))
    return max(1, int(round(h_mm / pixel_mm * zoom))), max(1, int(round(w_mm / pixel_mm * zoom)))


def _axial(arrays: Dict[str, np.ndarray], geometry: Optional[Geometry]):
    """Arrays reoriented to (inferior->superior, anterior->posterior, right->left) and their spacing."""
    from synomaly.files.geometry import Orientation

    if geometry is None:
        return arrays, (1.0, 1.0, 1.0)
    orientation = Orientation.for_image(arrays["volume"].shape, geometry)
    return ({k: orientation.apply(v) for k, v in arrays.items()}, orientation.spacing_zyx(geometry))


def compose_overview(volume, counterfactual, anomaly_map, segmentation, ground_truth=None,
                     geometry: Optional[Geometry] = None, n_slices: int = 3, map_max: Optional[float] = None,
                     slices: Optional[Sequence[int]] = None) -> Overview:
    """The overview picture and its layout.

    Arrays are (z, y, x) in the storage order of ``geometry`` (identity when None: already axial,
    LPS-ordered, 1 mm). ``slices`` are axial indices after reorientation (default: ``choose_slices``).
    The map is shown over [0, map_max], map_max defaulting to the map's 99.9th percentile.
    """
    from PIL import Image, ImageDraw

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

    arrays, spacing_zyx = _axial(arrays, geometry)
    vol = arrays["volume"]  # in its own type: slices are converted to float64 one at a time
    seg = arrays["segmentation"]
    gt = arrays.get("ground_truth")
    background, (lo, hi) = _grey_levels(volume, vol)
    rows = ([int(z) for z in slices] if slices is not None else
            choose_slices(vol, seg, int(n_slices), background))
    if not rows or min(rows) < 0 or max(rows) >= vol.shape[0]:
        raise InputError(f"slices must be axial indices between 0 and {vol.shape[0] - 1}, not {rows}.")
    vmax = _map_max(arrays["anomaly_map"], map_max)
    h, w = _display_size(vol.shape[1:], spacing_zyx[1:])

    width = 2 * MARGIN + len(COLUMNS) * w + (len(COLUMNS) - 1) * GAP
    height = TITLE_HEIGHT + len(rows) * h + (len(rows) - 1) * GAP + FOOTER_HEIGHT
    canvas = np.full((height, width, 3), BACKGROUND_RGB, dtype=np.uint8)
    overview = Overview(canvas, rows, map_max=vmax)
    for row, z in enumerate(rows):
        grey = _grey(_resize(np.nan_to_num(vol[z].astype(np.float64), nan=lo), (h, w), nearest=False), lo, hi)
        contours = grey.copy()
        if gt is not None:
            _contour(contours, _resize(gt[z] > 0, (h, w), nearest=True) > 0, GROUND_TRUTH_RGB)
        _contour(contours, _resize(seg[z] > 0, (h, w), nearest=True) > 0, SEGMENTATION_RGB)
        cf = np.nan_to_num(arrays["counterfactual"][z].astype(np.float64), nan=lo)
        amap = np.nan_to_num(arrays["anomaly_map"][z].astype(np.float64), nan=0.0)
        panels = [grey, _grey(_resize(cf, (h, w), nearest=False), lo, hi),
                  _hot(_resize(amap, (h, w), nearest=False), vmax), contours]
        top = TITLE_HEIGHT + row * (h + GAP)
        for col, (title, panel) in enumerate(zip(COLUMNS, panels)):
            left = MARGIN + col * (w + GAP)
            canvas[top:top + h, left:left + w] = panel
            overview.panels[(row, title)] = (top, left, top + h, left + w)

    footer = TITLE_HEIGHT + len(rows) * h + (len(rows) - 1) * GAP + 6
    # Colour bar under the map column: the 'hot' ramp from 0 to map_max, with its end values.
    bar_left, bar_width = MARGIN + 2 * (w + GAP) + 6, w - 12
    canvas[footer:footer + 10, bar_left:bar_left + bar_width] = _hot(
        np.tile(np.linspace(0.0, vmax, bar_width), (10, 1)), vmax)
    overview.labels["colour bar"] = (footer, bar_left, footer + 10, bar_left + bar_width)

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = _font()

    def text(key, xy, words, anchor):
        draw.text(xy, words, fill=TEXT_RGB, font=font, anchor=anchor)
        overview.labels[key] = _box(draw.textbbox(xy, words, font=font, anchor=anchor))

    for col, title in enumerate(COLUMNS):
        text(title, (MARGIN + col * (w + GAP) + w // 2, TITLE_HEIGHT // 2), title, "mm")
    two_d = 1 in shape
    for row in range(0 if two_d else len(rows)):
        middle = TITLE_HEIGHT + row * (h + GAP) + h // 2
        suffix = "" if row == 0 else f" {row}"
        text("R" + suffix, (MARGIN // 2, middle), "R", "mm")
        text("L" + suffix, (width - MARGIN // 2, middle), "L", "mm")
    text("colour bar 0", (bar_left, footer + 12), "0", "lt")
    text("colour bar max", (bar_left + bar_width, footer + 12), f"{vmax:.3g}", "rt")
    # Legend under the contours column.
    left = MARGIN + 3 * (w + GAP) + 6
    entries = [("ours", SEGMENTATION_RGB)] + ([("truth", GROUND_TRUTH_RGB)] if gt is not None else [])
    for i, (words, colour) in enumerate(entries):
        y = footer + 5 + 16 * i
        draw.line([(left, y), (left + 18, y)], fill=colour, width=3)
        overview.labels[f"legend {words}"] = (y - 1, left, y + 2, left + 19)
        text(f"legend {words} text", (left + 24, y), words, "lm")
    text("orientation", (MARGIN, height - 8), "2D image, as stored" if two_d else
         "axial, radiological: R on the left, anterior up", "ls")
    overview.image = np.asarray(picture).copy()
    return overview


def _box(bbox) -> Box:
    left, top, right, bottom = (int(round(v)) for v in bbox)
    return top, left, bottom, right


def render_overview(volume, counterfactual, anomaly_map, segmentation, path, ground_truth=None,
                    geometry: Optional[Geometry] = None, n_slices: int = 3,
                    map_max: Optional[float] = None) -> Overview:
    """Write the overview PNG to ``path`` atomically (no partial file is ever left behind).

    The counterfactual must be on the input's intensity scale: it shares the input's grey window.
    """
    overview = compose_overview(volume, counterfactual, anomaly_map, segmentation, ground_truth=ground_truth,
                                geometry=geometry, n_slices=n_slices, map_max=map_max)
    save_png(overview.image, path)
    return overview


def save_png(image: np.ndarray, path) -> None:
    """An RGB array as a PNG file, written atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    path = Path(path)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise OutputError(f"{path}: cannot be written ({exc.strerror or exc}).") from None
