"""Synthetic brain-like FLAIR phantoms: our own small test and demo data.

Real BraTS volumes cannot ship with the project, so tests, demos and smoke-training use these
phantoms instead. A phantom is a skull-stripped ellipsoidal brain with a bright cortical rim, darker
white matter, two dark ventricles with bright periventricular caps at their horns (healthy on FLAIR,
and as bright as much of a lesion), a dark interhemispheric fissure, a smooth bias-field-like texture
and scanner noise; optionally an irregular lesion of mixed intensity (glioma with oedema on FLAIR:
parts far brighter than any healthy tissue, parts only as bright as cortex and caps, sometimes a dimmer
core). A pure, uniformly bright lesion would be the one case where an intensity threshold cannot lose;
this one is fairer to a method that knows what healthy tissue looks like where.

``head="bright"`` or ``"dark"`` keeps the skull and scalp, as an unstripped FLAIR shows them: dark
subarachnoid CSF and cortical bone around the brain, then the scalp, bright fat (and marrow) without
fat suppression or dim with it, and noisy air (Rician) instead of a constant background.

Anatomy and lesion draw from independent random streams of the same seed, so the healthy phantom
of seed ``s`` is exactly the lesion phantom of seed ``s`` without its lesion: healthy and lesion
phantoms come from the same distribution, and their difference is the lesion only.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from synomaly.errors import InputError, OutputError
from synomaly.files.geometry import Geometry
from synomaly.files.volume_io import write_volume

DEFAULT_SHAPE = (32, 96, 96)
DEFAULT_SPACING = (1.0, 1.0, 2.0)
HEADS = (None, "bright", "dark")


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
                 lesion_radius_mm: Optional[float] = None, head: Optional[str] = None) -> Phantom:
    """Build one phantom; deterministic for a given (shape, seed, spacing, lesion_radius_mm, head).

    ``shape`` is (z, y, x) in voxels, ``spacing`` is (x, y, z) in mm (ITK order, as in Geometry).
    The lesion radius defaults to 6-10 mm (drawn per seed), reduced when the brain is too small.
    ``head``: None (skull-stripped, background exactly 0), "bright" or "dark" (skull and scalp kept,
    scalp fat bright or fat-suppressed; the brain shrinks so that the head fits the field of view).
    ``brain_mask`` is the brain in every case.
    """
    shape, spacing = _check_args(shape, spacing)
    if lesion_radius_mm is not None and float(lesion_radius_mm) <= 0:
        raise InputError(f"lesion_radius_mm must be positive, not {lesion_radius_mm}.")
    if head not in HEADS:
        raise InputError(f"head must be one of {', '.join(str(h) for h in HEADS)}, not {head!r}.")
    spacing_zyx = (spacing[2], spacing[1], spacing[0])
    anatomy_seq, lesion_seq, head_seq = np.random.SeedSequence(int(seed)).spawn(3)
    rng = np.random.default_rng(anatomy_seq)
    layers = _head_layers(np.random.default_rng(head_seq)) if head else None

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
    if layers is not None:
        shrink = min(1.0, (0.94 * half[1] - layers.total) / b, (0.94 * half[2] - layers.total) / a)
        if shrink * min(a, b) < 15.0:
            raise InputError(f"A phantom of shape {shape} is too small to hold a head; use a larger shape.")
        a, b, c = a * shrink, b * shrink, c * shrink

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

    caps = _periventricular_caps(rng, xr, yr, z, v_off, v_y, v_z, v_axes, tilt)

    wm_level = rng.uniform(115.0, 135.0)
    gm_level = wm_level * rng.uniform(1.20, 1.30)
    cap_level = wm_level * rng.uniform(1.40, 1.55)
    csf_level = rng.uniform(45.0, 65.0)
    tissue = wm_level * (1.0 + 0.03 * _smooth_field(rng, shape, spacing_zyx, 6.0))
    tissue = tissue + (gm_level - wm_level) * gm
    tissue = tissue * (1.0 - caps) + cap_level * caps
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
        tissue = tissue * (1.0 - weight) + _lesion_intensity(lrng, dist, reach, wm_level, shape, spacing_zyx) * weight
        lesion_mask = (weight >= 0.5).astype(np.uint8)

    volume = tissue * bias + noise
    if layers is None:
        volume = np.where(brain, np.maximum(np.rint(volume), 1.0), 0.0).astype(np.float32)
    else:
        hrng = np.random.default_rng(head_seq.spawn(1)[0])
        volume = _add_head(hrng, volume, brain, layers, head, wm_level, csf_level, bias, noise_sigma,
                           spacing_zyx)
    return Phantom(volume=volume, brain_mask=brain.astype(np.uint8), lesion_mask=lesion_mask,
                   geometry=Geometry.identity(spacing))


def _periventricular_caps(rng, xr, yr, z, v_off, v_y, v_z, v_axes, tilt) -> np.ndarray:
    """Soft weights of the periventricular caps: crescents of bright tissue around the tips of the
    frontal and occipital horns, thickest (4-7 mm) at the tips, a thin lining along the sides.

    Healthy on FLAIR (loose myelin and fluid around the horns) and as bright as many lesions, so an
    intensity threshold flags them while a model of healthy anatomy does not.
    """
    front, back = rng.uniform(4.0, 7.0), rng.uniform(2.5, 5.0)
    lining = rng.uniform(0.8, 1.5)
    caps = np.zeros(np.broadcast_shapes(xr.shape, yr.shape, z.shape), dtype=np.float32)
    for side in (-1.0, 1.0):
        u, v = xr - side * v_off, yr - v_y
        ur = np.cos(side * tilt) * u + np.sin(side * tilt) * v
        vr = -np.sin(side * tilt) * u + np.cos(side * tilt) * v
        rv = np.sqrt((ur / v_axes[0]) ** 2 + (vr / v_axes[1]) ** 2 + ((z - v_z) / v_axes[2]) ** 2)
        outside_mm = (rv - 1.0) * v_axes[0]  # approximate distance outside the ventricle, in mm
        along = vr / v_axes[1]                # -1 at the frontal tip, +1 at the occipital tip
        thickness = (lining + (front - lining) * np.clip(-along - 0.4, 0.0, 0.6) / 0.6
                     + (back - lining) * np.clip(along - 0.5, 0.0, 0.5) / 0.5)
        shell = _sigmoid((thickness - outside_mm) / 0.7) * _sigmoid(outside_mm / 0.5)
        caps = np.maximum(caps, shell)
    return caps


def _lesion_intensity(rng, dist, reach, wm_level: float, shape, spacing_zyx) -> np.ndarray:
    """Mixed lesion intensity: patches of bright oedema (1.7-2.0 x white matter) and of moderate
    signal (1.3-1.45 x, as bright as cortex and caps); half the lesions have a dimmer core (1.15-1.3 x)."""
    low, high = wm_level * rng.uniform(1.30, 1.45), wm_level * rng.uniform(1.70, 2.00)
    mix = _sigmoid(3.0 * _smooth_field(rng, shape, spacing_zyx, 6.0) + 1.0)
    level = low + (high - low) * mix
    if rng.random() < 0.5:
        core = _sigmoid((0.4 * reach - dist) / 1.0)
        level = level * (1.0 - core) + wm_level * rng.uniform(1.15, 1.30) * core
    return level * (1.0 + 0.03 * _smooth_field(rng, shape, spacing_zyx, 4.0))


@dataclass
class _HeadLayers:
    """Thicknesses in mm of the layers around the brain, inside out."""

    csf: float
    skull: float
    scalp: float

    @property
    def total(self) -> float:
        return self.csf + self.skull + self.scalp


def _head_layers(rng: np.random.Generator) -> _HeadLayers:
    return _HeadLayers(csf=rng.uniform(1.5, 3.0), skull=rng.uniform(5.0, 7.5), scalp=rng.uniform(3.0, 6.0))


def _add_head(rng, volume, brain, layers: _HeadLayers, head: str, wm_level: float, csf_level: float,
              bias, noise_sigma: float, spacing_zyx) -> np.ndarray:
    """Wrap the brain in CSF, skull (cortical bone with marrow between its tables) and scalp; noisy air.

    Layer thicknesses vary smoothly over the head (+-25 %). Bright: scalp fat 1.3-1.8 x white
    matter, marrow 0.9-1.4 x; dark (fat-suppressed): scalp 0.45-0.75 x, marrow 0.15-0.35 x.
    Bone is nearly void (0.04-0.10 x) and the air is the magnitude of complex Gaussian noise.
    """
    shape = volume.shape
    outside = ndimage.distance_transform_edt(~brain, sampling=spacing_zyx).astype(np.float32)
    vary = 1.0 + 0.25 * np.clip(_smooth_field(rng, shape, spacing_zyx, 40.0), -1.0, 1.0)
    d = outside / vary  # distance in units of the local layer scale
    inner, outer = layers.csf, layers.csf + layers.skull
    edge = 0.6
    csf = _sigmoid((d - 0.0) / edge) * _sigmoid((inner - d) / edge)
    skull = _sigmoid((d - inner) / edge) * _sigmoid((outer - d) / edge)
    scalp = _sigmoid((d - outer) / edge) * _sigmoid((layers.total - d) / edge)
    table = 0.3 * layers.skull
    marrow = skull * _sigmoid((d - inner - table) / edge) * _sigmoid((outer - table - d) / edge)
    marrow = marrow * _sigmoid(2.0 * _smooth_field(rng, shape, spacing_zyx, 20.0) + 1.0)
    if head == "bright":
        scalp_level, marrow_level = wm_level * rng.uniform(1.3, 1.8), wm_level * rng.uniform(0.9, 1.4)
    else:
        scalp_level, marrow_level = wm_level * rng.uniform(0.45, 0.75), wm_level * rng.uniform(0.15, 0.35)
    bone_level = wm_level * rng.uniform(0.04, 0.10)
    around = (csf_level * csf + bone_level * (skull - marrow) + marrow_level * marrow + scalp_level * scalp)
    around = around * bias + rng.standard_normal(shape).astype(np.float32) * noise_sigma
    tissue = np.where(brain, volume, around)
    # MR magnitude images: air and dark tissue carry Rician noise, never a constant or negative value.
    imaginary = rng.standard_normal(shape).astype(np.float32) * noise_sigma
    return np.rint(np.sqrt(tissue ** 2 + imaginary ** 2)).astype(np.float32)


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
