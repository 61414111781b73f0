"""Altered copies of real volumes: what other scanners and pipelines make of the same patient, and inputs of
another kind that a model must not answer.

Users bring FLAIR from every pipeline; we have BraTS-preprocessed volumes. These functions build, from ours,
copies that should still be answered (``ACCEPTABLE``: a bias field, winsorised or rescaled intensities;
``other_pipelines`` adds other grids) and copies that should not (``FOREIGN``: the contrast of another
sequence). The input-fit benchmark (``scripts/input_fit_benchmark.py``), the degraded-copy evaluation
(``scripts/degraded_copies.py``) and the tests share them. Every function returns a new array
(float32) and leaves its input unchanged; ``fg`` is the volume's foreground (brain, organ) as a bool array.
"""
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from synomaly.files.geometry import Geometry


def bias_field(image: np.ndarray, fg: np.ndarray, strength: float = 0.3) -> np.ndarray:
    """A smooth multiplicative field, as a receive coil leaves before N4 correction: ``exp(strength * f)``
    with ``f`` a tilted bowl from -1 to 1 over the volume (a gradient along two axes plus a quadratic term)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in image.shape]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    field = 0.5 * y + 0.3 * x + 0.4 * (x * x + z * z) - 0.2
    field = field / max(float(np.abs(field).max()), 1e-6)
    return (image.astype(np.float32) * np.exp(strength * field)).astype(np.float32)


def winsorise(image: np.ndarray, fg: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Intensities clipped to the foreground's ``low``-``high`` percentiles, as some pipelines do."""
    lo, hi = np.percentile(image[fg], [low, high])
    return np.clip(image.astype(np.float32), lo, hi)


def rescale(image: np.ndarray, fg: np.ndarray, factor: float = 37.5, offset: float = 100.0) -> np.ndarray:
    """Another intensity scale (scanner units instead of z-scores), the background kept at its new level."""
    return (image.astype(np.float32) * factor + offset).astype(np.float32)


def z_score(image: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Foreground mean 0 and standard deviation 1, the background 0, as many pipelines write FLAIR."""
    values = image[fg].astype(np.float64)
    out = np.zeros(image.shape, dtype=np.float32)
    out[fg] = (values - values.mean()) / max(values.std(), 1e-6)
    return out


def invert(image: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """The foreground's contrast reversed (dark CSF becomes bright, bright lesions dark): T1-like from a
    FLAIR, or a wrongly signed export."""
    out = image.astype(np.float32).copy()
    lo, hi = np.percentile(image[fg], [0.5, 99.5])
    out[fg] = np.clip(lo + hi - out[fg], lo, hi)
    return out


def t2_like(image: np.ndarray, fg: np.ndarray, fluid_percentile: float = 15.0) -> np.ndarray:
    """Fluid made bright, as in T2 without FLAIR's inversion pulse: the foreground's darkest voxels (CSF in
    a FLAIR) become the brightest, the rest keeps its contrast."""
    out = image.astype(np.float32).copy()
    fluid, top = np.percentile(image[fg], [fluid_percentile, 99.5])
    dark = fg & (image < fluid)
    out[dark] = top + (fluid - out[dark]) * 1.5
    return out


def resample(image: np.ndarray, geometry: Geometry, spacing: Tuple[float, float, float],
             size: Optional[Tuple[int, int, int]] = None, order: int = 1) -> Tuple[np.ndarray, Geometry]:
    """The volume on another grid of the same physical space (spacing (x, y, z) in mm; ``size`` (x, y, z)
    centred on the old grid's centre, default: the same extent): a 0.5 mm reconstruction, 2D slices, or the
    1 mm grid of a template space. Linear interpolation (``order`` 0: nearest, for masks)."""
    import SimpleITK as sitk

    old = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    old.SetSpacing(geometry.spacing)
    old.SetOrigin(geometry.origin)
    old.SetDirection(geometry.direction)
    old_size = np.array(old.GetSize(), dtype=float)
    spacing = np.array(spacing, dtype=float)
    new_size = (np.array(size, dtype=float) if size is not None
                else np.maximum(1, np.round(old_size * np.array(geometry.spacing) / spacing)))
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    centre = np.asarray(geometry.origin) + direction @ ((old_size - 1) * np.array(geometry.spacing) / 2)
    origin = centre - direction @ ((new_size - 1) * spacing / 2)
    interpolator = sitk.sitkLinear if order else sitk.sitkNearestNeighbor
    new = sitk.Resample(old, [int(n) for n in new_size], sitk.Transform(), interpolator, origin.tolist(),
                        spacing.tolist(), list(geometry.direction), float(image.min()), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(new), Geometry(tuple(spacing.tolist()), tuple(origin.tolist()), geometry.direction)


# Same-grid alterations, by name: those a model should answer, and those of another contrast.
ACCEPTABLE: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "bias field 0.3": bias_field, "bias field 0.6": lambda im, fg: bias_field(im, fg, 0.6),
    "winsorised 1-99 %": winsorise, "scanner units": rescale, "z-scored": z_score,
}
FOREIGN: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "inverted (T1-like)": invert, "fluid bright (T2-like)": t2_like,
}


def other_pipelines(image: np.ndarray, geometry: Geometry, fg: np.ndarray,
                    masks: Sequence[np.ndarray] = ()) -> Iterator[Tuple[str, np.ndarray, Geometry, List[np.ndarray]]]:
    """(name, image, geometry, masks) of the volume as other pipelines would give it: each of ``ACCEPTABLE`` on
    the same grid, 5 and 8 mm slices (a mask voxel kept where it covered half a new slice), a 0.5 mm in-plane
    grid and the 1 mm template grid of 182 x 218 x 182 (masks by nearest neighbour). ``masks`` (labels, organ
    masks) follow the volume onto each grid."""
    from synomaly.evaluation.liver_phantoms import thicker_slices

    masks = list(masks)
    for name, alter in ACCEPTABLE.items():
        yield name, alter(image, fg), geometry, masks
    for mm in (5.0, 8.0):
        thick, thick_geometry, thick_masks = thicker_slices(image, geometry, mm, masks)
        yield f"{mm:g} mm slices", thick, thick_geometry, thick_masks
    for name, spacing, size in (("0.5 mm in-plane", (0.5, 0.5, geometry.spacing[2]), None),
                                ("1 mm template grid", (1.0, 1.0, 1.0), (182, 218, 182))):
        regridded, new_geometry = resample(image, geometry, spacing, size)
        yield name, regridded, new_geometry, [resample(m.astype(np.float32), geometry, spacing, size, order=0)[0] > 0.5
                                              for m in masks]
