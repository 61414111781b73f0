"""The carotid preset's organ region: a disc around the vessel, made from its lumen mask (as published).

Per slice, the lumen mask's convex hull (so that a plaque denting the lumen stays inside) is dilated by
a margin: in millimetres where the pixel spacing is known, else in pixels. An image read with a pixel
spacing of exactly 1 x 1 counts as one without a stated spacing: that is what PNG and JPEG files
without a pixel size, and DICOM files without Pixel Spacing, are read as (here and in Slicer).
"""
from typing import Sequence, Tuple

import numpy as np

from synomaly.errors import InputError


def spacing_known(spacing_yx: Sequence[float]) -> bool:
    return not np.allclose(tuple(spacing_yx), 1.0)


def margin_used(spacing_yx: Sequence[float], margin_px: float, margin_mm: float) -> Tuple[float, str]:
    """The margin this image gets and its unit: mm where its spacing is known (and a mm margin given)."""
    if spacing_known(spacing_yx) and margin_mm > 0:
        return float(margin_mm), "mm"
    return float(margin_px), "px"


def vessel_disc(lumen_zyx: np.ndarray, spacing_zyx: Sequence[float], margin_px: float,
                margin_mm: float) -> np.ndarray:
    """The disc around the lumen, slice by slice along axis 0: convex hull, then every pixel within the
    margin of it. Slices without lumen stay empty; a mask without any lumen is an InputError."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    lumen = np.asarray(lumen_zyx) > 0
    if lumen.ndim != 3:
        raise InputError(f"the lumen mask must be a (z, y, x) volume, not {lumen.ndim}D.")
    if not lumen.any():
        raise InputError("the lumen mask is empty; give the vessel's lumen mask (its organ region, a disc "
                         "around the vessel, is made from it).")
    spacing_yx = tuple(float(s) for s in spacing_zyx[1:])
    margin, unit = margin_used(spacing_yx, margin_px, margin_mm)
    sampling = spacing_yx if unit == "mm" else (1.0, 1.0)
    disc = np.zeros(lumen.shape, dtype=bool)
    for z in np.flatnonzero(lumen.any(axis=(1, 2))):
        hull = convex_hull_image(lumen[z])
        disc[z] = ndimage.distance_transform_edt(~hull, sampling=sampling) <= margin
    return disc
