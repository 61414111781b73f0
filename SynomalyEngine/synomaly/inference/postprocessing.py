"""3D post-processing of the anomaly map: blur, border rim, per-volume scale, threshold, small-component
removal, component figures.

The map is zero outside the processed foreground, so the blur runs on the bounding box of its non-zero
voxels (grown by the kernel's radius, which makes it exact), and the components are labelled once for
both the small-component removal and the report.
"""
from typing import List, Sequence, Tuple

import numpy as np

TRUNCATE = 4.0  # scipy's default kernel radius, in sigmas


def support_box(array: np.ndarray, margins: Sequence[int]) -> Tuple[slice, ...]:
    """The bounding box of the non-zero voxels grown by ``margins``, clipped to the array."""
    nonzero = array if array.dtype == bool else array != 0  # a mask needs no full-size copy
    box = []
    for axis, margin in enumerate(margins):
        others = tuple(a for a in range(array.ndim) if a != axis)
        hits = np.flatnonzero(np.any(nonzero, axis=others))
        box.append(slice(max(0, hits[0] - margin), min(array.shape[axis], hits[-1] + margin + 1)))
    return tuple(box)


def blur_map(anomaly_map: np.ndarray, sigma_mm: float, spacing_zyx: Sequence[float], device=None) -> np.ndarray:
    """Gaussian blur with a physical sigma, so anisotropic volumes are smoothed alike in every direction.

    ``device``: a torch device to blur on (detection passes its GPU): the same filter as scipy's
    (``mode="nearest"``, same kernel), as three matrix products; None blurs with scipy on the CPU."""
    from scipy import ndimage

    source = np.asarray(anomaly_map, dtype=np.float32)  # no copy of a float32 map: the result is new anyway
    if sigma_mm <= 0 or not source.any():
        return source.copy()
    sigma = [sigma_mm / s for s in spacing_zyx]
    # Beyond the radius the truncated kernel is zero, and inside the margin "nearest" repeats zeros,
    # so blurring the grown box gives exactly the whole volume's result.
    box = support_box(source, [int(TRUNCATE * s + 0.5) for s in sigma])
    blurred = np.zeros_like(source)
    if device is None:
        blurred[box] = ndimage.gaussian_filter(source[box], sigma=sigma, mode="nearest", truncate=TRUNCATE)
    else:
        blurred[box] = _blur_with_torch(source[box], sigma, device)
    return blurred


def _blur_with_torch(box: np.ndarray, sigma: Sequence[float], device) -> np.ndarray:
    """The separable blur as one matrix product per axis on ``device`` (float32, TF32 off): the matrices
    repeat edge samples and take scipy's kernel radius, so this is ``ndimage.gaussian_filter``'s result."""
    import torch

    from synomaly.method.noise import blur_matrix

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 keeps 10 mantissa bits: not scipy's filter
    try:
        t = torch.from_numpy(np.ascontiguousarray(box)).to(device)
        for axis, s in enumerate(sigma):
            m = blur_matrix(t.shape[axis], float(s), False, t.device, torch.float32, int(TRUNCATE * s + 0.5))
            t = torch.movedim(torch.tensordot(m, t, dims=([1], [axis])), 0, axis)
        return t.cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def segment(anomaly_map: np.ndarray, threshold: float, min_component_mm3: float,
            voxel_volume_mm3: float, origin: Sequence[int] = (0, 0, 0)) -> Tuple[np.ndarray, List[dict]]:
    """Threshold, drop 26-connected components smaller than ``min_component_mm3``; return the uint8
    segmentation and its components (size, peak score, centre in voxel indices i, j, k), largest first.
    ``origin``: where ``anomaly_map`` starts in the volume (z, y, x) when it is a box of it; centres are the
    volume's."""
    from scipy import ndimage

    binary = anomaly_map > threshold
    if not binary.any():
        return binary.astype(np.uint8), []
    box = support_box(binary, (1, 1, 1)[:binary.ndim])
    labels, n = ndimage.label(binary[box], structure=np.ones((3,) * binary.ndim, dtype=bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = counts * voxel_volume_mm3 >= min_component_mm3
    keep[0] = False
    kept = np.flatnonzero(keep)
    segmentation = np.zeros(binary.shape, dtype=np.uint8)
    segmentation[box] = keep[labels]
    if kept.size == 0:
        return segmentation, []
    # Peaks and centres from the labelled voxels alone (scipy's per-label reductions sort the whole box).
    where = np.nonzero(labels)
    lab = labels[where]
    peak_of = np.full(n + 1, -np.inf)
    np.maximum.at(peak_of, lab, anomaly_map[box][where])
    centre_of = [np.bincount(lab, weights=axis, minlength=n + 1) / np.maximum(counts, 1) for axis in where]
    peaks = peak_of[kept]
    centres = list(zip(*(c[kept] for c in centre_of)))
    offset = [s.start + o for s, o in zip(box, origin)]
    found = [{"volume_ml": float(counts[k] * voxel_volume_mm3 / 1000.0), "voxels": int(counts[k]),
              "max_score": float(p),
              "centre_ijk": [round(float(c + o), 1) for c, o in reversed(list(zip(centre, offset)))]}
             for k, p, centre in zip(kept, peaks, centres)]
    return segmentation, sorted(found, key=lambda d: -d["voxels"])


def inner_region(foreground: np.ndarray, rim_mm: float, spacing_zyx) -> np.ndarray:
    """Foreground voxels farther than ``rim_mm`` from its border: most healthy false positives of a
    brain map sit in a thin rim along the brain mask, where partial volume and stripping vary."""
    from scipy import ndimage

    inner = np.zeros(foreground.shape, dtype=bool)
    if not foreground.any():
        return inner
    box = support_box(foreground, (1, 1, 1))
    # A zero border around the box, except across a single slice (a 2D image has a rim in-plane only).
    shape = foreground[box].shape
    pad = [(0, 0) if n == 1 else (1, 1) for n in shape]
    distance = ndimage.distance_transform_edt(np.pad(foreground[box], pad), sampling=spacing_zyx)
    inner[box] = distance[tuple(slice(a, a + n) for (a, _), n in zip(pad, shape))] > rim_mm
    return inner


def typical_level(anomaly_map: np.ndarray, foreground: np.ndarray, indices) -> float:
    """The map's typical level over the processed foreground: its 75th percentile, robust while lesions cover
    under a quarter of it. How much the network changed the volume as a whole: small for a volume like those
    it learnt, large for one of another kind, which it turns into what it knows everywhere."""
    region = np.zeros(foreground.shape, dtype=bool)
    region[list(indices)] = True
    region &= foreground
    level = float(np.percentile(anomaly_map[region], 75)) if region.any() else 0.0
    return max(level, 1e-4)


def scale_by_volume(anomaly_map: np.ndarray, uncertainty, foreground: np.ndarray, indices) -> float:
    """Divide the map (and its uncertainty), in place, by the volume's own typical level (``typical_level``),
    and return that level. Lets one threshold hold across scanners whose healthy maps differ in scale."""
    level = typical_level(anomaly_map, foreground, indices)
    anomaly_map /= level
    if uncertainty is not None:
        uncertainty /= level
    return level
