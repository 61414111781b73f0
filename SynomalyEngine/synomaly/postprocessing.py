"""3D post-processing of the anomaly map: blur, threshold, small-component removal, component figures."""
from typing import List, Sequence

import numpy as np


def blur_map(anomaly_map: np.ndarray, sigma_mm: float, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Gaussian blur with a physical sigma, so anisotropic volumes are smoothed alike in every direction."""
    from scipy import ndimage

    if sigma_mm <= 0:
        return anomaly_map
    sigma = [sigma_mm / s for s in spacing_zyx]
    return ndimage.gaussian_filter(anomaly_map.astype(np.float32), sigma=sigma, mode="nearest")


def segment(anomaly_map: np.ndarray, threshold: float, min_component_mm3: float,
            voxel_volume_mm3: float) -> np.ndarray:
    """Threshold, then drop 26-connected components smaller than ``min_component_mm3``."""
    from scipy import ndimage

    binary = anomaly_map > threshold
    if min_component_mm3 > 0 and binary.any():
        labels, n = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel_volume_mm3
        keep = sizes >= min_component_mm3
        keep[0] = False
        binary = keep[labels]
    return binary.astype(np.uint8)


def components(segmentation: np.ndarray, anomaly_map: np.ndarray, voxel_volume_mm3: float) -> List[dict]:
    """Size, peak score and centre (voxel indices i, j, k) of each component, largest first."""
    from scipy import ndimage

    labels, n = ndimage.label(segmentation > 0, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = ndimage.maximum(anomaly_map, labels, index)
    centres = ndimage.center_of_mass(segmentation > 0, labels, index)
    out = [{"volume_ml": float(c * voxel_volume_mm3 / 1000.0), "voxels": int(c), "max_score": float(p),
            "centre_ijk": [round(float(v), 1) for v in reversed(centre)]}
           for c, p, centre in zip(counts, np.atleast_1d(peaks), centres)]
    return sorted(out, key=lambda d: -d["voxels"])
