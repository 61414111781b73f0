"""Synthetic brain-like FLAIR phantoms: our own small test and demo data.

Real BraTS volumes cannot ship with the project, so tests, demos and smoke-training use these
phantoms instead. A phantom is a skull-stripped ellipsoidal brain with a bright cortical rim, darker
white matter, two dark ventricles, a dark interhemispheric fissure, a smooth bias-field-like texture
and scanner noise; optionally a hyperintense irregular lesion (glioma with oedema on FLAIR).

Anatomy and lesion draw from independent random streams of the same seed, so the healthy phantom
of seed ``s`` is exactly the lesion phantom of seed ``s`` without its lesion: healthy and lesion
phantoms come from the same distribution, and their difference is the lesion only.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .errors import InputError, OutputError
from .volume_io import Geometry, write_volume

DEFAULT_SHAPE = (32, 96, 96)
DEFAULT_SPACING = (1.0, 1.0, 2.0)


@dataclass
class Phantom:
    """One synthetic case; arrays are (z, y, x), spacing in the geometry is (x, y, z)."""

    volume: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray
    geometry: Geometry


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing_zyx: Sequence[float],
                  wavelength_mm: float) -> np.ndarray:
    """Zero-mean, unit-std random field varying over about ``wavelength_mm``.

    Cubic-spline upsampling of a coarse random grid, one axis at a time (the 3D spline is separable):
    far cheaper than a wide Gaussian blur or a 3D zoom at full size.
    """
    cells = [max(2, int(round(n * s / wavelength_mm)) + 2) for n, s in zip(shape, spacing_zyx)]
    field = rng.standard_normal(cells)
    for axis, (n, c) in enumerate(zip(shape, cells)):
        upsample = ndimage.zoom(np.eye(c), (n / c, 1.0), order=3, mode="nearest")[:n]
        field = np.moveaxis(np.tensordot(upsample, field, axes=([1], [axis])), 0, axis)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def _check_args(shape, spacing) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    if len(shape) != 3 or any(int(n) < 8 for n in shape):
        raise InputError(f"Phantom shape {tuple(shape)} is invalid: give 3 sizes (z, y, x), each at least 8.")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise InputError(f"Phantom spacing {tuple(spacing)} is invalid: "
                         "give 3 positive sizes (x, y, z) in mm.")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)


def _place_lesion(rng: np.random.Generator, brain_dist: np.ndarray, xr: np.ndarray, yr: np.ndarray,
                  b: float, radius: float, spacing_zyx) -> Tuple[Tuple[int, int, int], float, float]:
    """Pick a lesion centre voxel in one hemisphere, far enough from the brain border.

    The margin covers the largest outward deformation of the blob plus two voxels, so the lesion
    stays well inside the brain. Shrinks the radius when a small brain leaves no room.
    Returns (centre voxel, radius, side), side being +1 or -1 along the rotated x axis.
    """
    side = 1.0 if rng.random() < 0.5 else -1.0
    margin = 2.0 * max(spacing_zyx) + 0.5
    lateral = side * np.broadcast_to(xr, brain_dist.shape)
    central = np.abs(np.broadcast_to(yr, brain_dist.shape)) <= 0.6 * b
    for _ in range(12):
        need = 1.5 * radius + margin
        candidates = np.flatnonzero((brain_dist >= need) & (lateral >= 0.5 * radius) & central)
        if candidates.size:
            flat = int(candidates[rng.integers(candidates.size)])
            return tuple(int(i) for i in np.unravel_index(flat, brain_dist.shape)), radius, side
        radius *= 0.85
    raise InputError("The phantom brain is too small to hold a lesion; use a larger shape.")


def _star_radius(rng: np.random.Generator, directions: np.ndarray, terms: int = 7) -> np.ndarray:
    """Smooth random function of the direction, unit std: deforms a sphere into a star-shaped blob.

    A function of direction only keeps the blob connected (one piece), unlike a 3D noise threshold.
    """
    total = np.zeros(directions.shape[1:], dtype=float)
    weights = rng.uniform(0.5, 1.0, terms)
    for w in weights:
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        freq = rng.uniform(2.0, 4.5)
        phase = rng.uniform(0, 2 * np.pi)
        total += w * np.cos(freq * np.tensordot(axis, directions, axes=1) + phase)
    return total / np.sqrt(0.5 * np.sum(weights ** 2))


def make_phantom(shape=DEFAULT_SHAPE, lesion: bool = True, seed: int = 0, spacing=DEFAULT_SPACING,
                 lesion_radius_mm: Optional[float] = None) -> Phantom:
    """Build one phantom; deterministic for a given (shape, seed, spacing, lesion_radius_mm).

    ``shape`` is (z, y, x) in voxels, ``spacing`` is (x, y, z) in mm (ITK order, as in Geometry).
    The lesion radius defaults to 6-10 mm (drawn per seed), reduced when the brain is too small.
    """
    shape, spacing = _check_args(shape, spacing)
    if lesion_radius_mm is not None and float(lesion_radius_mm) <= 0:
        raise InputError(f"lesion_radius_mm must be positive, not {lesion_radius_mm}.")
    spacing_zyx = (spacing[2], spacing[1], spacing[0])
    anatomy_seq, lesion_seq = np.random.SeedSequence(int(seed)).spawn(2)
    rng = np.random.default_rng(anatomy_seq)

    nz, ny, nx = shape
    half = [0.5 * n * s for n, s in zip(shape, spacing_zyx)]
    z = ((np.arange(nz) - (nz - 1) / 2) * spacing_zyx[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing_zyx[1]).astype(np.float32)[None, :, None]
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing_zyx[2]).astype(np.float32)[None, None, :]

    # Head pose and size: small in-plane rotation and shift, random ellipsoid semi-axes.
    theta = np.deg2rad(rng.uniform(-8.0, 8.0))
    shift_x, shift_y = rng.uniform(-0.04, 0.04, 2) * np.array([half[2], half[1]])
    xs, ys = x - shift_x, y - shift_y
    xr = np.cos(theta) * xs + np.sin(theta) * ys
    yr = -np.sin(theta) * xs + np.cos(theta) * ys
    b = rng.uniform(0.80, 0.88) * half[1]
    a = min(b * rng.uniform(0.78, 0.90), 0.84 * half[2])
    c = rng.uniform(0.76, 0.86) * half[0]

    bumps = _smooth_field(rng, shape, spacing_zyx, 25.0)
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2 + (z / c) ** 2)
    brain = r * (1.0 + 0.035 * np.clip(bumps, -2.5, 2.5)) < 1.0
    brain = ndimage.binary_fill_holes(brain)
    brain_dist = ndimage.distance_transform_edt(brain, sampling=spacing_zyx).astype(np.float32)

    # Tissue classes as soft weights: cortex rim of varying thickness, fissure, ventricles.
    thickness = 3.2 + 0.9 * _smooth_field(rng, shape, spacing_zyx, 15.0)
    gm = _sigmoid((thickness - brain_dist) / 0.6)
    front_back = _sigmoid((np.abs(yr) - 0.5 * b) / 2.0)
    fissure = np.exp(-0.5 * (xr / 0.8) ** 2) * front_back
    gm = np.maximum(gm, np.exp(-0.5 * (xr / 2.5) ** 2) * front_back)
    csf = fissure
    v_off, v_y, v_z = rng.uniform(0.10, 0.15) * a, rng.uniform(-0.10, 0.0) * b, rng.uniform(0.0, 0.12) * c
    v_axes = (rng.uniform(0.06, 0.09) * a, rng.uniform(0.30, 0.40) * b, rng.uniform(0.22, 0.30) * c)
    tilt = -np.deg2rad(rng.uniform(8.0, 16.0))  # posterior horns diverge (y grows posteriorly)
    for side in (-1.0, 1.0):
        u, v = xr - side * v_off, yr - v_y
        ur = np.cos(side * tilt) * u + np.sin(side * tilt) * v
        vr = -np.sin(side * tilt) * u + np.cos(side * tilt) * v
        rv = np.sqrt((ur / v_axes[0]) ** 2 + (vr / v_axes[1]) ** 2 + ((z - v_z) / v_axes[2]) ** 2)
        csf = np.maximum(csf, _sigmoid((1.0 - rv) * v_axes[0] / 0.6))

    wm_level = rng.uniform(115.0, 135.0)
    gm_level = wm_level * rng.uniform(1.20, 1.30)
    csf_level = rng.uniform(45.0, 65.0)
    tissue = wm_level * (1.0 + 0.03 * _smooth_field(rng, shape, spacing_zyx, 6.0))
    tissue = tissue + (gm_level - wm_level) * gm
    tissue = tissue * (1.0 - csf) + csf_level * csf
    bias = 1.0 + 0.025 * np.clip(_smooth_field(rng, shape, spacing_zyx, 60.0), -2.5, 2.5)
    noise_sigma = rng.uniform(2.0, 4.0)
    noise = rng.standard_normal(shape).astype(np.float32) * noise_sigma

    lesion_mask = np.zeros(shape, dtype=np.uint8)
    if lesion:
        lrng = np.random.default_rng(lesion_seq)
        radius = float(lesion_radius_mm) if lesion_radius_mm is not None else lrng.uniform(6.0, 10.0)
        radius = min(radius, 0.45 * min(a, b, c))
        centre, radius, side = _place_lesion(lrng, brain_dist, xr, yr, b, radius, spacing_zyx)
        offset = np.stack(np.broadcast_arrays(z - z[centre[0], 0, 0], y - y[0, centre[1], 0],
                                              x - x[0, 0, centre[2]])).astype(np.float32)
        dist = np.sqrt(np.sum(offset ** 2, axis=0))
        directions = offset / np.maximum(dist, 1e-6)
        reach = radius * (1.0 + 0.25 * np.clip(_star_radius(lrng, directions), -2.0, 2.0))
        edge_mm = 1.5 * min(spacing)
        # The falx stops the lesion at the midline: it stays in its hemisphere.
        hemisphere = _sigmoid(side * xr / (0.5 * min(spacing)))
        weight = np.clip(0.5 + (reach - dist) / edge_mm, 0.0, 1.0) * hemisphere * brain
        lesion_level = wm_level * lrng.uniform(1.75, 2.0)
        lesion_tex = lesion_level * (1.0 + 0.04 * _smooth_field(lrng, shape, spacing_zyx, 5.0))
        tissue = tissue * (1.0 - weight) + lesion_tex * weight
        lesion_mask = (weight >= 0.5).astype(np.uint8)

    volume = np.rint(tissue * bias + noise)
    volume = np.where(brain, np.maximum(volume, 1.0), 0.0).astype(np.float32)
    return Phantom(volume=volume, brain_mask=brain.astype(np.uint8), lesion_mask=lesion_mask,
                   geometry=Geometry.identity(spacing))


def write_phantom_case(folder, seed: int = 0, lesion: bool = True, shape=DEFAULT_SHAPE,
                       spacing=DEFAULT_SPACING) -> Dict[str, Path]:
    """Write ``flair.nii.gz``, ``brainmask.nii.gz`` and ``seg.nii.gz`` into ``folder`` (created if needed).

    Returns the paths by role: ``{"flair": ..., "brainmask": ..., "seg": ...}``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder ({exc.strerror or exc}).") from None
    phantom = make_phantom(shape=shape, lesion=lesion, seed=seed, spacing=spacing)
    paths = {"flair": folder / "flair.nii.gz", "brainmask": folder / "brainmask.nii.gz",
             "seg": folder / "seg.nii.gz"}
    write_volume(paths["flair"], phantom.volume, phantom.geometry)
    write_volume(paths["brainmask"], phantom.brain_mask, phantom.geometry)
    write_volume(paths["seg"], phantom.lesion_mask, phantom.geometry)
    return paths
