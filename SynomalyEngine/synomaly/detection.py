"""Detection on a whole volume: preprocessing, multi-stage diffusion in batches, 3D post-processing.

Data flows one way: (array, geometry[, mask]) -> prepared slices -> network -> maps in the input's
grid -> segmentation and report. Inputs are never modified.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import DeviceError, InputError
from .volume_io import Geometry

DEFAULT_INFERENCE = {
    "mode": "multi",          # "multi": multi-stage with fusion; "single": fixed noise levels, no fusion
    "noise_level": 200,
    "single_noise_levels": [200],
    "max_stages": 3,
    "kernel_size": 7,
    "fusion_threshold": 0.2,
    "min_component_px": 30,
    "soft_fusion": False,
    "signed": True,
    "direction": 1,
    "blur_mm": 1.5,
    "min_component_mm3": 100.0,
    "ensemble": 1,
}


@dataclass
class DetectionSettings:
    """What a user may override; ``None`` means the model's own default."""

    device: str = "auto"
    stages: Optional[int] = None
    noise_level: Optional[int] = None
    threshold: Optional[float] = None
    ensemble: Optional[int] = None
    batch_size: Optional[int] = None  # None: 2 on CPU (small, cache-sized batches measured fastest), 32 on CUDA
    min_component_mm3: Optional[float] = None
    mode: Optional[str] = None
    seed: int = 0
    # Models whose preset needs skull-stripped input (brain) refuse a volume that does not look
    # skull-stripped unless a mask is given (``skullstrip.check_skull_stripped``); False skips the check.
    skull_check: bool = True
    skull_strip: Optional[str] = None  # "hd-bet": extract the brain first when no mask is given


@dataclass
class DetectionResult:
    anomaly_map: np.ndarray              # float32, input grid, normalised-intensity units
    segmentation: np.ndarray             # uint8, input grid
    counterfactual: np.ndarray           # float32, input grid, input intensity units
    uncertainty: Optional[np.ndarray]    # float32 (ensemble std), or None
    report: Dict = field(default_factory=dict)
    prepared: Optional[object] = None    # the PreparedVolume the network saw (normalised input, foreground...)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but CUDA is not available here "
                          "(no NVIDIA GPU or a CPU-only torch); use --device cpu or auto.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda.")
    return torch.device(name)


def inference_params(model, settings: DetectionSettings) -> Dict:
    params = dict(DEFAULT_INFERENCE)
    params.update(model.metadata.get("inference", {}))
    if settings.stages is not None:
        if settings.stages < 1:
            raise InputError("stages must be at least 1.")
        params["max_stages"] = int(settings.stages)
    if settings.noise_level is not None:
        steps = int(model.metadata.get("schedule", {}).get("num_steps", 1000))
        if not 0 < settings.noise_level < steps:
            raise InputError(f"noise level must be between 1 and {steps - 1}.")
        params["noise_level"] = int(settings.noise_level)
        params["single_noise_levels"] = [int(settings.noise_level)]
    if settings.min_component_mm3 is not None:
        params["min_component_mm3"] = float(settings.min_component_mm3)
    if settings.mode is not None:
        if settings.mode not in ("multi", "single"):
            raise InputError("mode must be 'multi' or 'single'.")
        params["mode"] = settings.mode
    if settings.ensemble is not None:
        if settings.ensemble < 1:
            raise InputError("ensemble size must be at least 1.")
        params["ensemble"] = int(settings.ensemble)
    return params


def brain_input(volume: np.ndarray, geometry: Geometry, model, mask: Optional[np.ndarray],
                settings: DetectionSettings, device):
    """(mask, what the report says about skull stripping): a brain model's input must be a brain.

    A given mask is used as it is; ``skull_strip`` extracts one; otherwise the volume must look
    skull-stripped (``skullstrip.check_skull_stripped``), unless the check is turned off.
    """
    from .preprocessing import check_volume
    from .presets import PRESETS
    from .skullstrip import SKULL_STRIPPERS, check_skull_stripped, hd_bet_brain_mask

    if settings.skull_strip is not None and settings.skull_strip not in SKULL_STRIPPERS:
        raise InputError(f"unknown skull stripper {settings.skull_strip!r}; use one of {', '.join(SKULL_STRIPPERS)}.")
    preset = PRESETS.get(model.preset)
    if preset is None or not preset.skull_stripped:
        return mask, {"result": "not needed", "preset": model.preset}
    if mask is not None:
        return mask, {"result": "mask given"}
    check_volume(volume)  # an unusable volume gets its own message before any measurement
    if settings.skull_strip == "hd-bet":
        return hd_bet_brain_mask(volume, geometry, str(device)), {"result": "brain extracted by HD-BET"}
    if not settings.skull_check:
        return None, {"result": "check turned off"}
    features = check_skull_stripped(volume, geometry)
    return None, dict(features.to_dict(), result="input looks skull-stripped")


def detect(volume: np.ndarray, geometry: Geometry, model, mask: Optional[np.ndarray] = None,
           settings: Optional[DetectionSettings] = None,
           progress: Optional[Callable[[float, str], None]] = None,
           cancel: Optional[Callable[[], bool]] = None,
           slices: Optional[Sequence[int]] = None) -> DetectionResult:
    """Detect anomalies in one volume. ``slices`` limits processing to these axial indices
    (of the reoriented volume; used by calibration). Raises InputError, DeviceError, Cancelled."""
    import torch

    from .multistage import StageSettings, run_single_stage, run_stages
    from .postprocessing import blur_map, components, segment
    from .preprocessing import PreprocessConfig, prepare_volume
    from .schedule import DiffusionSchedule

    settings = settings or DetectionSettings()
    params = inference_params(model, settings)
    device = resolve_device(settings.device)
    threshold = float(settings.threshold if settings.threshold is not None else model.threshold)
    timings = {}
    report_progress = progress or (lambda fraction, message: None)

    t0 = time.perf_counter()
    report_progress(0.0, "preprocessing")
    mask, skull = brain_input(volume, geometry, model, mask, settings, device)
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    prepared = prepare_volume(volume, geometry, config, mask)
    indices = prepared.slices if slices is None else [z for z in slices if z in set(prepared.slices)]
    timings["preprocess_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    network = model.network.to(device).eval()
    schedule = DiffusionSchedule(**model.metadata["schedule"])
    k = int(params["ensemble"])
    batch_size = settings.batch_size or (32 if device.type == "cuda" else 2)
    if batch_size < 1:
        raise InputError("batch size must be at least 1.")
    shape = prepared.normalised.shape
    diffs = np.zeros((k,) + shape, dtype=np.float32)
    preds = prepared.normalised.copy()
    stages_per_slice: List[int] = []
    if indices:
        images, masks = prepared.network_slices(indices)
        images = images.repeat(k, 1, 1, 1).to(device)
        masks = masks.repeat(k, 1, 1, 1).to(device)
        generator = torch.Generator().manual_seed(int(settings.seed))
        stage = StageSettings(noise_level=params["noise_level"], max_stages=params["max_stages"],
                              kernel_size=params["kernel_size"], fusion_threshold=params["fusion_threshold"],
                              min_component_px=params["min_component_px"], soft_fusion=params["soft_fusion"],
                              signed=params["signed"], direction=params["direction"])
        amp = device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if params["mode"] == "multi":
                result = run_stages(network, schedule, images, masks, stage, batch_size, generator,
                                    progress=lambda d, t, m: report_progress(0.05 + 0.85 * d / t, m),
                                    cancel=cancel)
                counterfactual, stages_per_slice = result.counterfactual, result.stages
            else:
                counterfactual = run_single_stage(network, schedule, images, params["single_noise_levels"],
                                                  batch_size, generator)
                stages_per_slice = [len(params["single_noise_levels"])] * images.shape[0]
        # The difference is taken at the network's resolution and then upsampled: comparing the
        # full-resolution input with an upsampled prediction would flag every detail lost by resizing.
        residual = (images - counterfactual.float()) * masks
        hw = shape[1:]
        x0 = prepared.normalised[indices]
        n = len(indices)
        estimates = []
        for draw in range(k):
            r = prepared.frame.from_network(residual[draw * n:(draw + 1) * n], hw, 0.0)
            r = np.where(prepared.foreground[indices], r, 0.0)
            estimates.append(np.clip(x0 - r, -1.0, 1.0))
            diffs[draw][indices] = params["direction"] * r if params["signed"] else np.abs(r)
        preds[indices] = np.mean(estimates, axis=0)
    timings["network_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report_progress(0.92, "post-processing")
    fg = prepared.foreground
    maps = [blur_map(np.clip(d, 0, None) if params["signed"] else d, params["blur_mm"], prepared.spacing_zyx) * fg
            for d in diffs]
    anomaly_map = np.mean(maps, axis=0).astype(np.float32)
    uncertainty = np.std(maps, axis=0).astype(np.float32) if k > 1 else None
    voxel_mm3 = geometry.voxel_volume_mm3
    seg = segment(anomaly_map, threshold, params["min_component_mm3"], voxel_mm3)
    orient = prepared.orientation
    anomaly_map = np.ascontiguousarray(orient.invert(anomaly_map))
    seg = np.ascontiguousarray(orient.invert(seg))
    uncertainty = np.ascontiguousarray(orient.invert(uncertainty)) if uncertainty is not None else None
    processed = np.zeros(shape, dtype=bool)
    processed[indices] = True
    processed = orient.invert(processed & fg)
    cf = np.where(processed, prepared.intensity.inverse(orient.invert(preds)), volume).astype(np.float32)
    comps = components(seg, anomaly_map, voxel_mm3)
    timings["postprocess_s"] = time.perf_counter() - t0
    in_fg = orient.invert(fg)
    report = {
        "anomalous_volume_ml": float(seg.sum() * voxel_mm3 / 1000.0),
        "n_components": len(comps),
        "components": comps,
        "max_score": float(anomaly_map.max()),
        "mean_score": float(anomaly_map[in_fg].mean()) if in_fg.any() else 0.0,
        "threshold": threshold,
        "threshold_source": "user" if settings.threshold is not None else "model calibration",
        "slices_processed": len(indices),
        "mean_stages": float(np.mean(stages_per_slice)) if stages_per_slice else 0.0,
        "settings": dict(params, seed=int(settings.seed), device=str(device)),
        "skull_check": skull,
        "model": {"name": model.name, "model_id": model.model_id},
        "timings_s": {key: round(v, 3) for key, v in timings.items()},
    }
    report_progress(1.0, "done")
    return DetectionResult(anomaly_map, seg, cf, uncertainty, report, prepared)
