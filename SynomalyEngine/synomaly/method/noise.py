"""Training noise: Synomaly noise (Gaussian + blob-shaped intensity offsets) and the ablation noises.

All functions return a tensor of the requested shape (B, C, H, W) on the requested device, and draw
from ``generator`` when given, so a seed reproduces a batch.
"""
import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

Direction = Union[int, Sequence[int]]


def kernel_radius(sigma: float) -> int:
    """Taps each side of the Gaussian kernel's centre: three sigmas, at least one."""
    return max(1, int(math.ceil(3.0 * sigma)))


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32, radius: Optional[int] = None) -> torch.Tensor:
    radius = kernel_radius(sigma) if radius is None else radius
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=32)
def blur_matrix(n: int, sigma: float, reflect: bool, device, dtype, radius: Optional[int] = None) -> torch.Tensor:
    """(n, n) matrix ``M`` with ``M @ v`` the Gaussian-blurred ``v``, edges reflected (or repeated), the
    kernel ``radius`` taps each side (default ``kernel_radius``; post-processing passes scipy's)."""
    r = kernel_radius(sigma) if radius is None else radius
    k = gaussian_kernel1d(sigma, dtype=torch.float64, radius=r)
    rows = torch.arange(n).view(-1, 1)
    taps = rows + torch.arange(-r, r + 1).view(1, -1)
    if reflect:
        taps = taps.abs()
        taps = torch.where(taps > n - 1, 2 * (n - 1) - taps, taps)
    else:
        taps = taps.clamp(0, n - 1)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.scatter_add_(1, taps, k.expand(n, -1).contiguous())
    return m.to(device=device, dtype=dtype)


def gaussian_blur2d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, C, H, W) tensor, reflect-padded so edges are not darkened.

    Done as two matrix products with banded matrices: the same sums as the padded 1D convolutions, and
    about 13x faster on a CPU, where single-channel convolutions are slow (it set training's pace)."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    reflect = min(h, w) > kernel_radius(sigma)
    return blur_matrix(h, float(sigma), reflect, x.device, x.dtype) @ x \
        @ blur_matrix(w, float(sigma), reflect, x.device, x.dtype).T


def blob_mask(g: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    """Binary blobs: blur ``g``, rescale each image to [0, 255], keep what lies above ``threshold``."""
    blurred = gaussian_blur2d(g, sigma)
    flat = blurred.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    scaled = (blurred - lo) / (hi - lo).clamp_min(1e-12) * 255.0
    return scaled > threshold


def _directions(direction: Direction, batch: int, device, generator) -> torch.Tensor:
    choices = torch.tensor([direction] if isinstance(direction, (int, float)) else list(direction),
                           dtype=torch.float32)
    if choices.numel() == 0 or not torch.all(choices.abs() == 1):
        raise ValueError(f"direction must be +1, -1 or a list of them, got {direction!r}")
    idx = torch.randint(len(choices), (batch,), generator=generator)
    return choices[idx].to(device)


def synomaly_noise(shape, sigma: float = 3.0, threshold: float = 175.0, offset: float = 0.5,
                   direction: Direction = 1, organ_mask: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, device="cpu") -> torch.Tensor:
    """Gaussian noise plus blob offsets ``direction * (u + offset)`` inside the blobs (SPEC, Synomaly noise).

    ``organ_mask`` (B, 1 or C, H, W), when given, confines the blobs to the anatomy. With several channels
    (a slice and its neighbours, 2.5D) the blobs are the middle channel's in every channel: a synthetic
    lesion spans the neighbouring slices as a real one does, while the Gaussian part differs per channel.
    """
    b, mid = shape[0], shape[1] // 2
    g = torch.randn(shape, generator=generator).to(device)
    mask = blob_mask(g[:, mid:mid + 1], sigma, threshold)
    if organ_mask is not None:
        mask = mask & (organ_mask.to(device) > 0)
    u = torch.rand(b, generator=generator).to(device)
    amplitude = _directions(direction, b, device, generator) * (u + offset)
    return g + amplitude.view(-1, 1, 1, 1) * mask.to(g.dtype)


def gaussian_noise(shape, generator=None, device="cpu", **_) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


def coarse_noise(shape, scale: int = 16, generator=None, device="cpu", **_) -> torch.Tensor:
    """Low-resolution Gaussian noise upsampled bilinearly and randomly rolled (Kascenas et al. 2022)."""
    b, c, h, w = shape
    low = torch.randn((b, c, max(1, h // scale), max(1, w // scale)), generator=generator)
    up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    shifts = torch.randint(0, max(h, w), (b, 2), generator=generator)
    rolled = torch.stack([torch.roll(up[i], (int(shifts[i, 0]), int(shifts[i, 1])), dims=(-2, -1))
                          for i in range(b)])
    return (rolled / rolled.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)).to(device)


def pyramid_noise(shape, discount: float = 0.8, generator=None, device="cpu", **_) -> torch.Tensor:
    """Sum of Gaussian noise at halving resolutions, weighted by ``discount**level``, unit variance."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    level = 1
    while h >> level >= 2 and w >> level >= 2:
        low = torch.randn((b, c, h >> level, w >> level), generator=generator)
        noise = noise + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount ** level
        level += 1
    return (noise / noise.flatten(1).std(dim=1).view(-1, 1, 1, 1)).to(device)


def simplex_noise(shape, frequency: float = 1 / 16, octaves: int = 4, persistence: float = 0.6,
                  generator=None, device="cpu", **_) -> torch.Tensor:
    """Multi-octave simplex noise (opensimplex), unit variance per image (Wyatt et al. 2022)."""
    import numpy as np
    import opensimplex

    b, c, h, w = shape
    seeds = torch.randint(0, 2 ** 31 - 1, (b * c,), generator=generator).tolist()
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    out = np.zeros((b * c, h, w), dtype=np.float32)
    for i, seed in enumerate(seeds):
        opensimplex.seed(seed)
        for o in range(octaves):
            f = frequency * 2 ** o
            out[i] += persistence ** o * opensimplex.noise2array(xs * f, ys * f).astype(np.float32)
    t = torch.from_numpy(out).view(b, c, h, w)
    t = (t - t.flatten(1).mean(1).view(-1, 1, 1, 1)) / t.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return t.to(device)


NOISE_FUNCTIONS = {
    "synomaly": synomaly_noise,
    "gaussian": gaussian_noise,
    "coarse": coarse_noise,
    "pyramid": pyramid_noise,
    "simplex": simplex_noise,
}


def make_noise(kind: str, shape, generator=None, device="cpu", organ_mask=None, **params) -> torch.Tensor:
    """Draw training noise of the named kind; Synomaly parameters go in ``params``."""
    if kind not in NOISE_FUNCTIONS:
        raise ValueError(f"unknown noise {kind!r}; choose one of {sorted(NOISE_FUNCTIONS)}")
    if kind == "synomaly":
        return synomaly_noise(shape, organ_mask=organ_mask, generator=generator, device=device, **params)
    return NOISE_FUNCTIONS[kind](shape, generator=generator, device=device)
