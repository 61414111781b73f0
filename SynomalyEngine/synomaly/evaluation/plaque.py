"""Plaque-like lesions inserted into carotid ultrasound images, with their masks.

Our carotid images have no plaque labels, so detection is measured on lesions of known shape put into
held-out healthy images; the evaluation (``scripts/carotid_experiment.py``) and the tests use this one
function. A plaque here is an echogenic wall thickening: a crescent on the inner side of the vessel
wall, growing from the lumen's boundary into the lumen, thickest in the middle of its arc and tapering
to nothing at its ends. Its grey level is that of the image's own wall (a percentile of a ring just
outside the lumen), with speckle-like texture and an edge softened over about a pixel. A clinician would
outline the lumen left beside it, which ``insert_plaque`` returns as well: that is the lumen mask to
give detection.
"""
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import numpy as np

from synomaly.errors import InputError


@dataclass(frozen=True)
class PlaqueSettings:
    """Ranges each plaque's parameters are drawn from, uniformly."""

    thickness: Tuple[float, float] = (0.2, 0.45)      # at the arc's middle, in lumen radii (equivalent circle)
    arc_degrees: Tuple[float, float] = (60.0, 150.0)  # angular extent, seen from the lumen's centre
    wall_percentile: Tuple[float, float] = (60.0, 90.0)  # grey level: this percentile of the wall ring
    wall_ring_px: float = 20.0                        # width of the ring outside the lumen that is sampled
    speckle: float = 0.25                             # texture: relative spread of the grey level
    speckle_sigma_px: float = 2.0                     # texture grain (the images' speckle is a few pixels)
    edge_sigma_px: float = 1.0                        # edge softening

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class Plaque:
    image: np.ndarray  # the input with the plaque, same shape and type
    mask: np.ndarray   # bool, same shape: the plaque (the ground truth)
    lumen: np.ndarray  # bool, same shape: the lumen left beside the plaque (the lumen mask to give detection)
    params: Dict       # what was drawn: centre angle, arc, thickness, grey level


def _one_slice(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and 1 in array.shape:
        array = array.reshape([n for n in array.shape if n != 1])
    if array.ndim != 2:
        raise InputError(f"the {what} must be a 2D image (or a volume of one slice), not of shape {array.shape}.")
    return array


def insert_plaque(image: np.ndarray, lumen: np.ndarray, seed: int,
                  settings: PlaqueSettings = PlaqueSettings()) -> Plaque:
    """One plaque in ``image`` (2D, or one slice) beside the lumen ``lumen`` (non-zero inside); ``seed``
    decides every random draw, so the same seed gives the same plaque. The input is not modified."""
    from scipy import ndimage

    shape = np.shape(image)
    grey = _one_slice(image, "image")
    inside = _one_slice(lumen, "lumen mask") > 0
    if inside.shape != grey.shape:
        raise InputError(f"the lumen mask has shape {inside.shape}, the image {grey.shape}.")
    labels, n = ndimage.label(inside)
    if n == 0:
        raise InputError("the lumen mask is empty: a plaque is placed beside the lumen.")
    inside = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))  # the vessel, not specks
    rng = np.random.default_rng(seed)
    ys, xs = np.nonzero(inside)
    cy, cx = ys.mean(), xs.mean()
    radius = float(np.sqrt(inside.sum() / np.pi))
    centre_angle = float(rng.uniform(-np.pi, np.pi))
    half_arc = float(np.deg2rad(rng.uniform(*settings.arc_degrees)) / 2)
    thickness = float(rng.uniform(*settings.thickness) * radius)
    percentile = float(rng.uniform(*settings.wall_percentile))

    yy, xx = np.mgrid[:grey.shape[0], :grey.shape[1]]
    offset = np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - centre_angle)))  # wrapped to (-pi, pi]
    profile = thickness * np.sqrt(np.clip(1.0 - (offset / half_arc) ** 2, 0.0, None))
    depth = ndimage.distance_transform_edt(inside)  # from the lumen's edge inwards, in pixels
    mask = inside & (depth <= profile)
    if not mask.any():
        raise InputError(f"the lumen is too small (equivalent radius {radius:.1f} pixels) for a plaque.")

    outside = ndimage.distance_transform_edt(~inside)
    ring = (outside > 0) & (outside <= settings.wall_ring_px)
    level = float(np.percentile(grey[ring], percentile)) if ring.any() else float(np.percentile(grey, 90))
    grain = ndimage.gaussian_filter(rng.standard_normal(grey.shape), settings.speckle_sigma_px)
    texture = level * np.clip(1.0 + settings.speckle * grain / max(float(grain.std()), 1e-12), 0.0, None)
    weight = ndimage.gaussian_filter(mask.astype(np.float64), settings.edge_sigma_px) if settings.edge_sigma_px > 0 \
        else mask.astype(np.float64)
    out = grey.astype(np.float64) * (1.0 - weight) + texture * weight
    if np.issubdtype(grey.dtype, np.integer):
        info = np.iinfo(grey.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    params = {"seed": int(seed), "centre_angle_deg": round(float(np.rad2deg(centre_angle)), 2),
              "arc_deg": round(float(np.rad2deg(2 * half_arc)), 2), "thickness_px": round(thickness, 2),
              "lumen_radius_px": round(radius, 2), "wall_percentile": round(percentile, 2),
              "grey_level": round(level, 2), "area_px": int(mask.sum())}
    left = (_one_slice(lumen, "lumen mask") > 0) & ~mask
    return Plaque(out.astype(grey.dtype).reshape(shape), mask.reshape(shape), left.reshape(shape), params)
