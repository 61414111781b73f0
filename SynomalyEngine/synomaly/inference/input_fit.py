"""How far an input is from the volumes a model was calibrated on: a label-free out-of-distribution score.

A diffusion model given what it never learnt (a T2 for a FLAIR model, a brain for a liver model, a
body mask for a liver mask) still returns a map and a volume, and that answer looks as confident as a
right one. Each input is therefore described by a few numbers that need no labels (its intensity profile
after normalisation, the region's size and extents, how much the network changed it), and each is compared
with the range those numbers took on the model's calibration volumes (``calibration.input_reference`` in the
model file). The score is the largest distance outside that range, in units of the range's width: 0 inside
it, 1 a full width beyond. Detection reports it, warns past ``WARN_SCORE`` and refuses an intensity profile past
``REFUSE_SCORE``. A brain FLAIR with its contrast inverted keeps its histogram's shape, and the network
reconstructs it as readily; what gives it away is where its brightest voxels lie (``fluid_order``).
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from synomaly.errors import InputError

# Quantiles of the normalised foreground intensity ([-1, 1]): the shape of the histogram, which the
# robust normalisation leaves to the contrast (its median is fixed by construction and so not a feature).
QUANTILES = (5, 25, 75, 95)
# How each feature is compared, and its smallest range width, so that a narrow range (a few calibration
# volumes of one scanner) does not turn small differences into large scores: "quantile" in network units
# (8 mm slices of the same brain move the 25th percentile by up to 0.35, partial volume); "saturated" a share;
# "log" and "extent", positive features compared on a log scale, a ratio.
# "order", a signed contrast whose sign is the point, is compared with zero, not with a range: its unit is
# the distance from zero that counts as one width (FLAIRs from every pipeline measured stayed below -0.028).
MIN_WIDTH = {"quantile": 0.2, "saturated": 0.02, "log": math.log(1.5), "extent": math.log(1.15), "order": 0.05}
# Each feature: (kind, words for a message).
FEATURES = {
    "p05": ("quantile", "5th intensity percentile"), "p25": ("quantile", "25th intensity percentile"),
    "p75": ("quantile", "75th intensity percentile"), "p95": ("quantile", "95th intensity percentile"),
    "saturated": ("saturated", "share of the region at the top of the intensity range"),
    "region_ml": ("log", "size of the region analysed (mL)"),
    "change": ("log", "how much the network changed the input"),
    "short_mm": ("extent", "shortest extent of the region (mm)"),
    "long_mm": ("extent", "longest extent of the region (mm)"),
    "fluid_order": ("order", "brightness of fluid against tissue (below 0: fluid dark, as in FLAIR)"),
}
WARN_SCORE = 1.0
REFUSE_SCORE = 3.0
# Only the intensity profile refuses: the region's size and shape and the network's change also vary with
# anatomy and disease (a child's brain, a partial slab, a large tumour), so past the limit they warn.
REFUSING = tuple(name for name, (kind, _) in FEATURES.items() if kind in ("quantile", "saturated", "order"))
# Fewer calibration volumes than this give a range too narrow to refuse on (one volume: a point; a model
# trained on one CT would refuse every other CT): the score then warns only.
MIN_VOLUMES_TO_REFUSE = 5


def intensity_profile(prepared, brain: bool = False) -> Dict[str, float]:
    """The features known before the network runs: intensity quantiles and the saturated share of the
    region (its foreground, over the slices processed), and the region's size and extents for a 3D volume;
    for a ``brain`` (a skull-stripped preset), where its fluid lies in the intensity order."""
    region = np.zeros(prepared.foreground.shape, dtype=bool)
    region[prepared.slices] = prepared.foreground[prepared.slices]
    values = prepared.normalised[region]
    if values.size == 0:
        return {}
    values = values[:: max(1, values.size // 1_000_000)]
    profile = {f"p{q:02d}": float(v) for q, v in zip(QUANTILES, np.percentile(values, QUANTILES))}
    profile["saturated"] = float(np.mean(values >= 0.999))
    if prepared.foreground.shape[0] > 1:
        voxel_ml = float(np.prod(prepared.spacing_zyx)) / 1000.0
        profile["region_ml"] = float(np.count_nonzero(prepared.foreground)) * voxel_ml
        profile.update(_extents(prepared.foreground, prepared.spacing_zyx))
        if brain:
            profile.update(fluid_order(prepared))
    return profile


def fluid_order(prepared, smooth_mm: float = 10.0, border_mm: float = 3.0) -> Dict[str, float]:
    """Whether the brain's fluid is its darkest or its brightest tissue, from where the extremes lie.

    The CSF of a skull-stripped brain sits in a thin layer along its border (sulci) and in left-right mirrored
    structures (the ventricles); lesions are mostly inside and one-sided. So after removing slow intensity
    changes (bias fields: detail = intensity minus its 10 mm average), the share of the border layer among the
    brightest 5 % minus its share among the darkest 5 %, plus the same for voxels whose mirror image is also
    extreme, is below 0 in every FLAIR measured (38 real volumes, each through 9 other pipelines, masks eroded
    by up to 4 voxels: at most -0.028) and above 0 in each of them inverted (+0.014 to +0.514). Every second
    voxel in-plane, about 0.4 s for a BraTS volume."""
    from scipy import ndimage

    fg = prepared.foreground[:, ::2, ::2]
    if fg.sum() < 1000:
        return {}
    sz, sy, sx = prepared.spacing_zyx
    spacing = (sz, 2.0 * sy, 2.0 * sx)
    x = prepared.normalised[:, ::2, ::2].astype(np.float32)
    sigma = [smooth_mm / s for s in spacing]
    # Zeros beyond the array, as beyond the foreground: the foreground's box and the whole volume agree.
    weight = ndimage.gaussian_filter(fg.astype(np.float32), sigma, mode="constant")
    average = ndimage.gaussian_filter(np.where(fg, x, 0.0).astype(np.float32), sigma, mode="constant")
    average /= np.maximum(weight, 1e-3)
    detail = np.where(fg, x - average, 0.0)
    low, high = np.percentile(detail[fg], [5, 95])
    bright, dark = fg & (detail >= high), fg & (detail <= low)
    depth = ndimage.distance_transform_edt(np.pad(fg, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    border = fg & (depth <= border_mm)
    order = _share(bright, border) - _share(dark, border)
    columns = np.flatnonzero(fg.any(axis=(0, 1)))  # axis 2 runs right to left: mirror about the brain's middle
    mirror = np.clip(columns.min() + columns.max() - np.arange(fg.shape[2]), 0, fg.shape[2] - 1)
    both = fg & fg[:, :, mirror]
    order += _share(bright[:, :, mirror], bright & both) - _share(dark[:, :, mirror], dark & both)
    return {"fluid_order": float(order)}


def _share(where: np.ndarray, among: np.ndarray) -> float:
    """The share of ``among`` that is in ``where`` (0 when ``among`` is empty)."""
    n = np.count_nonzero(among)
    return float(np.count_nonzero(where & among)) / n if n else 0.0


def _extents(foreground: np.ndarray, spacing_zyx) -> Dict[str, float]:
    """The region's shortest and longest extent: four standard deviations along its principal axes (a
    brain is about 110 x 125 x 155 mm; a liver is flatter or longer), from a sample of its voxels."""
    coords = np.argwhere(foreground)
    coords = coords[:: max(1, len(coords) // 200_000)] * np.asarray(spacing_zyx, dtype=float)
    if len(coords) < 10:
        return {}
    spread = 4.0 * np.sqrt(np.clip(np.linalg.eigvalsh(np.cov(coords.T)), 0.0, None))
    return {"short_mm": float(spread.min()), "long_mm": float(spread.max())}


def reference_from(profiles: Sequence[Dict[str, float]], source: str) -> Dict:
    """The range of each feature over calibration volumes' profiles, as stored in a model file."""
    features = {}
    for name in sorted({k for p in profiles for k in p}):
        values = [p[name] for p in profiles if name in p and math.isfinite(p[name])]
        if values:
            features[name] = {"low": float(min(values)), "high": float(max(values)),
                              "median": float(np.median(values))}
    return {"volumes": len(profiles), "source": source, "features": features}


def _distance(value: float, ref: Dict[str, float], kind: str) -> float:
    low, high = ref["low"], ref["high"]
    if kind == "order":  # the sign the calibration volumes share; none shared, nothing to compare
        sign = 1.0 if low > 0 else -1.0 if high < 0 else 0.0
        return max(0.0, -sign * value) / MIN_WIDTH[kind]
    if kind in ("log", "extent"):
        value, low, high = (math.log(max(v, 1e-6)) for v in (value, low, high))
    width = max(high - low, MIN_WIDTH[kind])
    return max(0.0, value - high, low - value) / width


def fit_score(profile: Dict[str, float], reference: Optional[Dict]) -> Dict:
    """The input's distances from the reference, feature by feature, and the verdict on the largest."""
    if not reference or not reference.get("features"):
        return {"score": None, "verdict": "unknown: the model file holds no input reference", "profile": profile}
    distances = {name: round(_distance(value, reference["features"][name], FEATURES[name][0]), 3)
                 for name, value in profile.items() if name in reference["features"]}
    worst = max(distances, key=distances.get) if distances else None
    score = distances[worst] if worst else 0.0
    verdict = ("typical" if score == 0 else "close" if score <= WARN_SCORE else
               "unusual" if score <= REFUSE_SCORE else "outside")
    return {"score": score, "verdict": verdict, "worst": worst, "distances": distances, "profile": profile,
            "reference_volumes": reference.get("volumes")}


def describe(fit: Dict, reference: Dict) -> str:
    """One sentence on the features beyond the range, the worst first, with the input's value and the range."""
    parts = []
    for name in sorted(fit["distances"], key=fit["distances"].get, reverse=True):
        if fit["distances"][name] <= WARN_SCORE:
            break
        ref = reference["features"][name]
        parts.append(f"{FEATURES[name][1]} {fit['profile'][name]:.3g} against {ref['low']:.3g} to "
                     f"{ref['high']:.3g} ({fit['distances'][name]:.1f} ranges away)")
    return "; ".join(parts)


def check_fit(fit: Dict, reference: Optional[Dict], model_name: str, enforce: bool) -> List[str]:
    """Warnings for an unusual input; InputError for an intensity profile outside, unless ``enforce`` is False."""
    if fit.get("score") is None or fit["score"] <= WARN_SCORE:
        return []
    detail = describe(fit, reference)
    if enforce and (reference.get("volumes") or 0) >= MIN_VOLUMES_TO_REFUSE \
            and max([fit["distances"].get(name, 0.0) for name in REFUSING]) > REFUSE_SCORE:
        raise InputError(f"this input is far from the volumes the {model_name} model was calibrated on ({detail}): "
                         "the answer would not mean what it says. Check that the image is the modality and sequence "
                         "the model expects, in its units, and that the mask is the organ; pass --no-fit-check "
                         "(fit_check=False in Python) to run it anyway.")
    return [f"input unlike the {model_name} model's calibration volumes ({detail}); read the result with care."]
