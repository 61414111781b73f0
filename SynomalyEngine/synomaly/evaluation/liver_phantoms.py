"""Altered copies of real liver CTs: thicker slices, another contrast phase, inserted lesions with their masks.

We have three liver CTs; users bring arterial and late phases, 5 mm series and tumours brighter or darker
than their liver. These functions build such test volumes from ours, and the evaluation
(``scripts/liver_ct_benchmark.py``), the training recipe (thicker copies) and the tests share them.

- ``thicker_slices``: what a thicker reconstruction of the same scan would look like: every new slice is the
  average of the thin slices it covers (a Gaussian slice profile whose full width at half maximum is the
  new thickness), sampled every ``thickness_mm``.
- ``shift_phase``: the liver's HU shifted by a constant (the liver enhances less in the arterial phase than
  in the portal-venous one, and not at all without contrast); tumours move with it.
- ``insert_lesions``: spheres of given diameters added to the liver's own HU (its texture and noise kept)
  by a constant contrast, edges softened over about a millimetre, placed in healthy liver away from the
  liver's border, from labelled tumours and from each other.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from synomaly.errors import InputError
from synomaly.files.geometry import Geometry

EDGE_MM = 1.0  # width over which an inserted lesion's contrast fades in
BORDER_MM = 3.0  # least distance between a lesion's edge and the liver's border or another lesion


def _spacing_zyx(geometry: Geometry) -> Tuple[float, float, float]:
    return tuple(float(s) for s in reversed(geometry.spacing))


def thicker_slices(image: np.ndarray, geometry: Geometry, thickness_mm: float,
                   masks: Sequence[np.ndarray] = ()) -> Tuple[np.ndarray, Geometry, List[np.ndarray]]:
    """``image`` (z, y, x) resliced along its first axis (ITK's k, the slice axis of an axial series) at
    ``thickness_mm``, with each of ``masks`` (a mask voxel is kept where it covered half the new slice).
    Returns the new image (float32, HU), its geometry and the masks (bool)."""
    from scipy import ndimage

    step = float(geometry.spacing[2])
    if thickness_mm <= step:
        raise InputError(f"thicker_slices makes slices thicker: {thickness_mm} mm is not above the "
                         f"volume's {step:g} mm.")
    n_old = image.shape[0]
    n_new = int(np.floor((n_old * step) / thickness_mm))
    if n_new < 1:
        raise InputError(f"the volume is {n_old * step:g} mm long: too short for one {thickness_mm} mm slice.")
    # New slice j covers [j T, (j + 1) T) from the first thin slice's leading edge; its centre in thin indices:
    centres = ((np.arange(n_new) + 0.5) * thickness_mm) / step - 0.5
    sigma = np.sqrt(max((thickness_mm / 2.3548) ** 2 - (step / 2.3548) ** 2, 1e-6)) / step

    # Linear interpolation between the two smoothed thin slices around each centre.
    below = np.clip(np.floor(centres).astype(int), 0, n_old - 1)
    above = np.minimum(below + 1, n_old - 1)
    weight = (centres - below).astype(np.float32).reshape(-1, 1, 1)

    def reslice(volume):
        smooth = ndimage.gaussian_filter1d(volume.astype(np.float32), sigma, axis=0, mode="nearest")
        return smooth[below] * (1 - weight) + smooth[above] * weight

    new_image = reslice(image)
    new_masks = [reslice(np.asarray(m) > 0) >= 0.5 for m in masks]
    k_axis = geometry.direction_matrix[:, 2]
    origin = np.asarray(geometry.origin, dtype=float) + k_axis * float(centres[0]) * step
    new_geometry = Geometry((geometry.spacing[0], geometry.spacing[1], float(thickness_mm)),
                            tuple(float(v) for v in origin), geometry.direction)
    return new_image, new_geometry, new_masks


def room_mm(free: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Each voxel's distance (mm) to the nearest voxel outside ``free``; the volume's edge counts as outside
    (a crop to the liver cuts it there). A sphere fits around a voxel whose room is at least its radius."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(np.pad(free, 1), sampling=_spacing_zyx(geometry))[1:-1, 1:-1, 1:-1]


def shift_phase(image: np.ndarray, liver: np.ndarray, shift_hu: float) -> np.ndarray:
    """A copy of ``image`` (float32) with ``shift_hu`` added inside the liver: another contrast phase."""
    out = np.asarray(image, dtype=np.float32).copy()
    out[np.asarray(liver) > 0] += float(shift_hu)
    return out


@dataclass
class InsertedLesions:
    image: np.ndarray     # float32, HU: the input with the lesions
    lesions: np.ndarray   # int16, same shape: 0 outside, i inside lesion i (1-based)
    centres_zyx: List[Tuple[int, int, int]]
    diameters_mm: List[float]
    contrasts_hu: List[float]


def _sphere(shape, centre, radius_mm, spacing_zyx):
    """Signed distance (mm) from a sphere's surface in a box around it; the box's slices."""
    box = tuple(slice(max(int(c - np.ceil((radius_mm + 2 * EDGE_MM) / s)), 0),
                      min(int(c + np.ceil((radius_mm + 2 * EDGE_MM) / s)) + 1, n))
                for c, s, n in zip(centre, spacing_zyx, shape))
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre, spacing_zyx)],
                        indexing="ij")
    return np.sqrt(sum(g ** 2 for g in grids)) - radius_mm, box


def insert_lesions(image: np.ndarray, liver: np.ndarray, geometry: Geometry, diameters_mm: Sequence[float],
                   contrast_hu: Tuple[float, float], seed: int,
                   avoid: Optional[np.ndarray] = None) -> InsertedLesions:
    """Spherical lesions of ``diameters_mm`` in the healthy liver, each ``contrast_hu`` (a range, drawn
    uniformly; negative: darker than the liver) from its surroundings. ``avoid``: labelled tumours, kept
    ``BORDER_MM`` plus the lesion's radius away. ``seed`` decides every draw. The input is not modified."""
    liver = np.asarray(liver) > 0
    if liver.shape != np.shape(image):
        raise InputError(f"the liver mask has shape {liver.shape}, the image {np.shape(image)}.")
    spacing = _spacing_zyx(geometry)
    rng = np.random.default_rng(seed)
    free = liver.copy()
    if avoid is not None:
        free &= ~(np.asarray(avoid) > 0)
    out = np.asarray(image, dtype=np.float32).copy()
    lesions = np.zeros(out.shape, dtype=np.int16)
    centres, contrasts = [], []
    for number, diameter in enumerate(sorted(diameters_mm, reverse=True), start=1):
        radius = diameter / 2.0
        candidates = np.argwhere(room_mm(free, geometry) >= radius + BORDER_MM)
        if not len(candidates):
            raise InputError(f"no room for a {diameter:g} mm lesion in this liver (with {BORDER_MM:g} mm to its "
                             "border, to tumours and to the other lesions).")
        centre = tuple(int(v) for v in candidates[rng.integers(len(candidates))])
        contrast = float(rng.uniform(*contrast_hu))
        distance, box = _sphere(out.shape, centre, radius, spacing)
        weight = np.clip(0.5 - distance / EDGE_MM, 0.0, 1.0)  # 1 inside, fading to 0 over EDGE_MM at the surface
        out[box] += contrast * weight.astype(np.float32)
        lesions[box][distance <= 0] = number
        free[box][distance <= 0] = False  # the next lesion keeps its radius + BORDER_MM away
        centres.append(centre)
        contrasts.append(contrast)
    return InsertedLesions(out, lesions, centres, sorted((float(d) for d in diameters_mm), reverse=True), contrasts)
