"""From a volume to network-ready 2D slices and back.

Steps, each invertible so every output lands exactly in the input's geometry:
checks -> foreground mask -> intensity normalisation to [-1, 1] -> reorientation so that
array[z] is an axial slice -> in-plane crop to the foreground, square, resize to the network size.
A 2D image (a volume of one slice) is taken as stored: its one slice is the network's slice.
Detection normalises only the foreground's bounding box, grown so that every later step there gives what it
gives on the whole volume (``prepare_in_box``); the whole-volume steps before it make no float copy of it.
"""
import functools
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np

from synomaly.errors import InputError
from synomaly.files.geometry import Geometry, Orientation
from synomaly.files.volume_io import background_level, volume_sample
from synomaly.inference.postprocessing import support_box


@dataclass
class PreprocessConfig:
    """Stored in every model file: inference must see what training saw."""

    intensity: str = "robust"  # "robust" (per-volume percentiles) or "window" (fixed, e.g. CT HU)
    window: Optional[Tuple[float, float]] = None
    bright_factor: float = 3.0  # robust: value 1.0 sits at p_low + bright_factor * (median - p_low)
    low_percentile: float = 0.5
    image_size: int = 128
    margin_mm: float = 4.0
    min_foreground_fraction: float = 0.02  # slices with less foreground (in the crop) are skipped
    # > 0 (carotid): the mask is a lumen and the foreground the disc around it (``vessel_disc``).
    disc_margin_px: float = 0.0
    disc_margin_mm: float = 0.0
    # 2.5D: this many neighbouring slices each side go to the network as extra channels (edges repeated).
    context_slices: int = 0

    @property
    def lumen_mask(self) -> bool:
        """Whether the mask is a vessel's lumen, from which the foreground (a disc) is made: then it is required."""
        return self.disc_margin_px > 0 or self.disc_margin_mm > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["window"] = list(self.window) if self.window is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("window") is not None:
            known["window"] = tuple(float(v) for v in known["window"])
        return cls(**known)


def check_volume(array: np.ndarray, what: str = "input") -> None:
    """Reject what the method cannot process, naming the problem and the fix."""
    if array.ndim != 3:
        raise InputError(f"{what} is {array.ndim}D; a 3D scalar volume is needed.")
    if array.size == 0 or min(array.shape) == 0:
        raise InputError(f"{what} is empty (size {tuple(reversed(array.shape))}).")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{what} has voxel type {array.dtype}; a real-valued scalar volume is needed.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{what} contains {bad} NaN or infinite voxels; fix or mask them before detection.")
    # Size before the label-map test: a tiny image has few distinct values and would pass for a label map.
    if min(array.shape[1:]) < 16:
        raise InputError(f"{what} is too small ({tuple(reversed(array.shape))} voxels); "
                         "slices need at least 16 x 16 voxels.")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(f"{what} is constant (every voxel is {lo}); there is no image to analyse.")
    sample = volume_sample(array, 200_000)
    if np.unique(sample).size <= 8:
        values = np.unique(array)
        if values.size <= 8 and np.all(values == np.round(values)):
            raise InputError(f"{what} looks like a label map (only the values {values.tolist()}); "
                             "give the intensity image, and pass a label map as --mask if it is an organ mask.")


MAX_MASK_LABELS = 64  # a label map of a whole body has some 100 labels; an image has thousands of values


def mask_problem(mask: np.ndarray) -> Optional[str]:
    """Why ``mask`` is not a mask (an image, a probability map), or None: a mask holds 0 and a few whole numbers."""
    if mask.dtype.kind == "b":
        return None
    if mask.dtype.kind == "f" and (not np.isfinite(mask).all() or not np.array_equal(mask, np.round(mask))):
        return "it holds fractional values (an image or a probability map?); give a mask of 0 and 1, or of labels"
    labels = np.unique(mask[mask != 0])
    if labels.size and labels.min() < 0:
        return "it holds negative values (an image?); give a mask of 0 and 1, or of labels"
    if labels.size > MAX_MASK_LABELS:
        return f"it holds {labels.size} different values (an image?); give a mask of 0 and 1, or of labels"
    return None


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill each axial slice's holes, in place, working on the slice's bounding box plus one pixel: the
    same result as on the whole slice (outside the box everything is background joined to the border),
    at a fraction of the cost on a head that fills part of the field of view."""
    from scipy import ndimage

    for z in range(mask.shape[0]):
        ys = np.flatnonzero(mask[z].any(axis=1))
        if ys.size == 0:
            continue
        xs = np.flatnonzero(mask[z].any(axis=0))
        box = (z, slice(max(ys[0] - 1, 0), ys[-1] + 2), slice(max(xs[0] - 1, 0), xs[-1] + 2))
        mask[box] = ndimage.binary_fill_holes(mask[box])
    return mask


def background_lowest(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy in which a constant background inside the intensity range (0 in a volume
    z-scored within its brain mask) is set below every other value, so that "background" is "lowest" for
    the foreground and skull-stripping checks, as it is for raw and min-filled volumes. A value is such a
    background when it fills over a tenth of the volume."""
    sample = volume_sample(array)
    low = sample.min()
    if np.count_nonzero(sample == low) > 0.1 * sample.size:
        return array
    values, counts = np.unique(sample, return_counts=True)
    if counts.max() <= 0.1 * sample.size:
        return array
    lowered = np.array(array, dtype=np.float32)
    lowered[array == values[counts.argmax()]] = float(low) - 1.0
    return lowered


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Foreground (head, organ) without labels: above a constant background (``background_lowest``), or
    above Otsu's threshold.

    Robust to isolated extremes: the background level is a percentile (``background_level``), Otsu's
    threshold is taken on intensities clipped to their 0.5-99.5th percentiles, and components smaller
    than 0.1 % of the foreground are dropped (a lone bright voxel in the air would stretch the crop).
    Voxels at or below the background inside the foreground become holes, which are filled.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    array = background_lowest(array)
    lo = background_level(array)
    at_background = array <= lo + 1e-6 * max(1.0, abs(lo))
    constant_background = at_background.mean() > 0.1
    if constant_background:
        mask = np.logical_not(at_background, out=at_background)  # in place: one full-size mask, not two
    else:
        sample = volume_sample(array).astype(np.float64)
        p_lo, p_hi = np.percentile(sample, [0.5, 99.5])
        mask = array > threshold_otsu(np.clip(sample, p_lo, p_hi))
    del at_background
    if not mask.any():
        return mask
    # The components are labelled on the mask's bounding box: the same pieces, without a full-size label
    # volume (4 bytes a voxel) when the head fills a small part of the field of view.
    box = support_box(mask, (0,) * mask.ndim)
    labels, n = ndimage.label(mask[box])
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        # Otsu's mask: the largest piece (the head); a masked volume: every piece but specks.
        mask[box] = (np.isin(labels, np.flatnonzero(sizes >= 0.001 * sizes.sum())) if constant_background
                     else labels == sizes.argmax())
    del labels
    return fill_holes_per_slice(mask)


@dataclass
class Intensity:
    """A monotone map of input units to [-1, 1] and its inverse."""

    low: float
    scale: float

    def forward(self, x: np.ndarray) -> np.ndarray:
        """A new C-ordered float32 array (the input, or a view of it, is never changed), computed in place:
        one volume of memory, not four temporaries."""
        y = np.array(x, dtype=np.float32, order="C")
        y -= self.low
        y *= 2.0
        y /= self.scale
        y -= 1.0
        return np.clip(y, -1.0, 1.0, out=y)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return ((y.astype(np.float32) + 1.0) * 0.5 * self.scale + self.low).astype(np.float32)


def fit_intensity(array: np.ndarray, foreground: np.ndarray, config: PreprocessConfig) -> Intensity:
    """Robust mode works for raw scanner integers and z-scores alike: it only uses foreground percentiles."""
    if config.intensity == "window":
        lo, hi = config.window
        return Intensity(float(lo), float(hi - lo))
    values = array[foreground]
    if values.size < 100:
        raise InputError("the foreground holds fewer than 100 voxels; give a mask that covers the organ.")
    sample = values[:: max(1, values.size // 2_000_000)].astype(np.float64)
    low, median = np.percentile(sample, [config.low_percentile, 50.0])
    scale = config.bright_factor * (median - low)
    if not scale > 0:
        raise InputError("the foreground has no intensity contrast (its median equals its low percentile).")
    return Intensity(float(low), float(scale))




@dataclass
class SliceFrame:
    """Where the network's square slices sit inside the reoriented volume's slices."""

    y0: int
    y1: int
    x0: int
    x1: int
    size: int
    resized: Tuple[int, int]  # crop size after resizing, before padding to size x size
    pad: Tuple[int, int]      # top, left

    def to_network(self, planes, fill: float, mode: str = "bilinear"):
        """(N, H, W) reoriented planes -> (N, 1, size, size) tensor."""
        import torch
        import torch.nn.functional as F

        crop = torch.as_tensor(np.ascontiguousarray(planes[:, self.y0:self.y1, self.x0:self.x1]),
                               dtype=torch.float32)[:, None]
        if mode == "nearest":
            small = F.interpolate(crop, size=self.resized, mode="nearest")
        else:
            small = F.interpolate(crop, size=self.resized, mode="bilinear", align_corners=False, antialias=True)
        out = torch.full((crop.shape[0], 1, self.size, self.size), fill, dtype=torch.float32)
        top, left = self.pad
        out[:, :, top:top + self.resized[0], left:left + self.resized[1]] = small
        return out

    def from_network(self, tensor, shape_hw, fill: float) -> np.ndarray:
        """(N, 1, size, size) tensor -> (N, H, W) numpy planes, ``fill`` outside the crop."""
        import torch.nn.functional as F

        top, left = self.pad
        small = tensor[:, :, top:top + self.resized[0], left:left + self.resized[1]].float()
        crop = F.interpolate(small, size=(self.y1 - self.y0, self.x1 - self.x0), mode="bilinear",
                             align_corners=False)
        out = np.full((tensor.shape[0],) + tuple(shape_hw), fill, dtype=np.float32)
        out[:, self.y0:self.y1, self.x0:self.x1] = crop[:, 0].cpu().numpy()
        return out


def slice_frame(foreground_zyx: np.ndarray, spacing_zyx, config: PreprocessConfig) -> SliceFrame:
    """In-plane crop around the foreground (plus a margin), squared in millimetres, aspect ratio kept."""
    _, sy, sx = spacing_zyx
    h, w = foreground_zyx.shape[1:]
    ys = np.where(foreground_zyx.any(axis=(0, 2)))[0]
    xs = np.where(foreground_zyx.any(axis=(0, 1)))[0]
    if ys.size == 0:
        raise InputError("the foreground mask is empty; give a mask that covers the organ.")
    my, mx = int(np.ceil(config.margin_mm / sy)), int(np.ceil(config.margin_mm / sx))
    y0, y1 = max(0, ys[0] - my), min(h, ys[-1] + 1 + my)
    x0, x1 = max(0, xs[0] - mx), min(w, xs[-1] + 1 + mx)
    extent = max((y1 - y0) * sy, (x1 - x0) * sx)
    size = config.image_size
    ry = max(1, min(size, int(round((y1 - y0) * sy / extent * size))))
    rx = max(1, min(size, int(round((x1 - x0) * sx / extent * size))))
    return SliceFrame(int(y0), int(y1), int(x0), int(x1), size, (ry, rx), ((size - ry) // 2, (size - rx) // 2))


@dataclass
class PreparedVolume:
    """A volume ready for the network, with everything needed to map results back."""

    normalised: np.ndarray   # reoriented (z, y, x), [-1, 1]
    foreground: np.ndarray   # reoriented (z, y, x), bool
    orientation: Orientation
    intensity: Intensity
    frame: SliceFrame
    spacing_zyx: Tuple[float, float, float]
    slices: List[int]        # axial indices with enough foreground to process
    context_slices: int = 0  # neighbours each side stacked as channels (2.5D); 0: the slice alone

    def network_slices(self, indices=None):
        """(N, 1 + 2k, S, S) images (slices z - k ... z + k, the volume's end slices repeated beyond it) and
        (N, 1, S, S) foreground masks of the slices themselves, for the given axial indices (default: all
        processed)."""
        import torch

        idx = self.slices if indices is None else list(indices)
        k, last = self.context_slices, self.normalised.shape[0] - 1
        images = torch.cat([self.frame.to_network(self.normalised[[min(max(z + d, 0), last) for z in idx]], fill=-1.0)
                            for d in range(-k, k + 1)], dim=1)
        masks = self.frame.to_network(self.foreground[idx].astype(np.float32), fill=0.0, mode="nearest") > 0.5
        return images, masks


def volume_foreground(array: np.ndarray, geometry: Geometry, config: PreprocessConfig,
                      mask: Optional[np.ndarray] = None, what: str = "input"):
    """The checks, and the foreground (in the input's grid) with the orientation and reoriented spacing:
    the steps that need the whole volume, none of them making a float copy of it."""
    check_volume(array, what)
    orientation = Orientation.for_image(array.shape, geometry)
    spacing = orientation.spacing_zyx(geometry)
    if config.lumen_mask and mask is None:
        raise InputError(f"the {what} needs the vessel's lumen mask: this model looks at a disc around the vessel, "
                         "made from it. Give it with --mask (command line), as the mask column of a training "
                         "CSV, or as the mask in Slicer.")
    if mask is not None:
        if mask.shape != array.shape:
            raise InputError(f"the mask has size {tuple(reversed(mask.shape))} but the {what} has "
                             f"{tuple(reversed(array.shape))}; resample the mask onto the image grid.")
        problem = mask_problem(mask)
        if problem:
            raise InputError(f"the mask is not a mask: {problem}.")
        foreground = mask > 0
        if foreground.all():
            raise InputError("the mask covers the whole image, so it masks nothing; give the organ's mask, or none.")
        if config.lumen_mask:
            from synomaly.inference.vessel_disc import vessel_disc

            disc = vessel_disc(orientation.apply(foreground), spacing, config.disc_margin_px, config.disc_margin_mm)
            foreground = orientation.invert(disc)
        elif not foreground.any():
            raise InputError("the mask is empty; give a mask that covers the organ, or none.")
    else:
        foreground = foreground_mask(array)
        if not foreground.any():
            raise InputError(f"no foreground found in the {what}; give a mask.")
    return foreground, orientation, spacing


def prepare_foreground(array: np.ndarray, foreground: np.ndarray, orientation: Orientation, spacing_zyx,
                       config: PreprocessConfig) -> PreparedVolume:
    """Normalisation, reorientation, frame and slices, given the foreground (``volume_foreground``)."""
    intensity = fit_intensity(array, foreground, config)
    normalised = intensity.forward(orientation.apply(array))  # one float32 copy, already reoriented
    fg = orientation.apply(foreground)
    normalised[~fg] = -1.0
    frame = slice_frame(fg, spacing_zyx, config)
    crop_area = (frame.y1 - frame.y0) * (frame.x1 - frame.x0)
    fractions = fg[:, frame.y0:frame.y1, frame.x0:frame.x1].sum(axis=(1, 2)) / crop_area
    slices = [int(z) for z in np.where(fractions >= config.min_foreground_fraction)[0]]
    return PreparedVolume(normalised, fg, orientation, intensity, frame, spacing_zyx, slices, config.context_slices)


def prepare_volume(array: np.ndarray, geometry: Geometry, config: PreprocessConfig,
                   mask: Optional[np.ndarray] = None, what: str = "input") -> PreparedVolume:
    foreground, orientation, spacing = volume_foreground(array, geometry, config, mask, what)
    return prepare_foreground(array, foreground, orientation, spacing, config)


@dataclass
class VolumeBox:
    """The part of a volume that detection works on: the foreground's bounding box, grown by the margins that
    make every step there give what it gives on the whole volume (``foreground_box``)."""

    box: Tuple[slice, slice, slice]  # in the input's (stored) grid
    shape: Tuple[int, int, int]      # the whole input's
    orientation: Orientation

    @property
    def whole(self) -> bool:
        return all(s.start == 0 and s.stop == n for s, n in zip(self.box, self.shape))

    @property
    def reoriented(self) -> Tuple[slice, ...]:
        """The same box in the reoriented grid (``Orientation.apply``'s)."""
        out = []
        for axis, flip in zip(self.orientation.perm, self.orientation.flip):
            s, n = self.box[axis], self.shape[axis]
            out.append(slice(n - s.stop, n - s.start) if flip else s)
        return tuple(out)

    def place(self, part: np.ndarray, fill, reoriented: bool = False) -> np.ndarray:
        """``part`` (the box, in the input's grid, or in the reoriented grid with ``reoriented``) in a whole
        volume of ``fill``: a value, or a whole array of that grid whose copy (in ``part``'s type) takes it."""
        if self.whole:
            return part
        box = self.reoriented if reoriented else self.box
        shape = tuple(self.shape[axis] for axis in self.orientation.perm) if reoriented else self.shape
        if isinstance(fill, np.ndarray):
            whole = fill.astype(part.dtype)
        elif fill == 0:
            whole = np.zeros(shape, dtype=part.dtype)  # pages the box does not touch take no memory
        else:
            whole = np.full(shape, fill, dtype=part.dtype)
        whole[box] = part
        return whole


def foreground_box(foreground: np.ndarray, orientation: Orientation, spacing_zyx,
                   config: PreprocessConfig) -> VolumeBox:
    """The foreground's bounding box in the input's grid, grown so that what detection computes in it equals
    what it computes on the whole volume: in-plane by the slice frame's margin (the same frame), along the
    slices by the 2.5D neighbours (the same stacks), and everywhere by one voxel more, so that the box's
    border holds no foreground and the map's blur and rim see the zeros beyond it."""
    _, sy, sx = spacing_zyx
    reoriented = (config.context_slices, int(np.ceil(config.margin_mm / sy)), int(np.ceil(config.margin_mm / sx)))
    margins = [0, 0, 0]
    for axis, margin in zip(orientation.perm, reoriented):
        margins[axis] = margin + 2
    return VolumeBox(support_box(foreground, margins), foreground.shape, orientation)


class PlacedVolume:
    """A PreparedVolume of a box of the volume (``inner``), seen in the whole volume's reoriented grid as
    ``prepare_volume`` would give it: axial indices and frame of the whole volume, and its whole arrays
    (``normalised``, ``foreground``), made on first use, since detection itself needs only the box."""

    def __init__(self, inner: PreparedVolume, box: VolumeBox):
        import dataclasses

        self.inner, self.box = inner, box
        self.start = tuple(s.start for s in box.reoriented)
        z, y, x = self.start
        self.orientation, self.intensity = inner.orientation, inner.intensity
        self.spacing_zyx, self.context_slices = inner.spacing_zyx, inner.context_slices
        f = inner.frame
        self.frame = dataclasses.replace(f, y0=f.y0 + y, y1=f.y1 + y, x0=f.x0 + x, x1=f.x1 + x)
        self.slices = [i + z for i in inner.slices]

    @functools.cached_property
    def normalised(self) -> np.ndarray:
        return self.box.place(self.inner.normalised, -1.0, reoriented=True)

    @functools.cached_property
    def foreground(self) -> np.ndarray:
        return self.box.place(self.inner.foreground, False, reoriented=True)

    def local(self, indices) -> List[int]:
        """Axial indices of the whole volume as the box's; only slices inside the box have any."""
        n = self.inner.normalised.shape[0]
        local = [int(z) - self.start[0] for z in indices]
        if any(not 0 <= z < n for z in local):
            raise IndexError(f"axial slices outside the foreground's box ({self.start[0]} to "
                             f"{self.start[0] + n - 1}) have no foreground to process")
        return local

    def network_slices(self, indices=None):
        """``PreparedVolume.network_slices`` for axial indices of the whole volume."""
        return self.inner.network_slices(None if indices is None else self.local(indices))


def prepare_in_box(array: np.ndarray, geometry: Geometry, config: PreprocessConfig,
                   mask: Optional[np.ndarray] = None, what: str = "input") -> PlacedVolume:
    """``prepare_volume`` working on the foreground's box: the float32 volumes are the box's, not the whole
    field of view's (a small head in a large empty volume), and the slices, maps and counterfactual made from
    it are those of the whole volume (``foreground_box``)."""
    foreground, orientation, spacing = volume_foreground(array, geometry, config, mask, what)
    box = foreground_box(foreground, orientation, spacing, config)
    inner_foreground = foreground[box.box].copy()
    del foreground  # the whole volume's mask: the box holds all of it
    return PlacedVolume(prepare_foreground(array[box.box], inner_foreground, orientation, spacing, config), box)
