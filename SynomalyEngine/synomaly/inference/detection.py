"""Detection on a whole volume: preprocessing, multi-stage diffusion in batches, 3D post-processing.

Data flows one way: (array, geometry[, mask]) -> prepared slices -> network -> maps in the input's
grid -> segmentation and report. Inputs are never modified. Everything past the foreground mask works on
the foreground's bounding box (``preprocessing.prepare_in_box``), so that a small head in a large empty
volume costs memory for the head, not for the field of view.
"""
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from synomaly import __version__
from synomaly.errors import DeviceError, InputError, ModelFileError
from synomaly.files.geometry import Geometry
from synomaly.files.volume_io import is_2d

MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed's range for non-negative seeds
SLICES_PER_CHUNK = 16  # network outputs are brought back to the volume's grid this many slices at a time

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
    "rim_mm": 0.0,          # map set to zero within this distance of the foreground's border
    "map_scale": "none",    # "volume": map divided by its 75th percentile over the volume's processed foreground
    # A second, finer map for lesions the blur would hide: the same difference blurred at ``fine_blur_mm``, scaled
    # as the map is, times ``fine_gain`` (the model's threshold over the fine map's own, calibrated on healthy
    # tissue), and the map is the larger of the two. 0 turns it off.
    "fine_blur_mm": 0.0,
    "fine_gain": 0.0,
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
    blur_mm: Optional[float] = None  # Gaussian sigma of the map (mm); less keeps small lesions, more false positives
    mode: Optional[str] = None
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 on CPUs with native bf16, else fp32 (CUDA too); or force either
    maps_only: bool = False  # no threshold, no segmentation: for calibration, which needs the maps alone
    # Models whose preset needs skull-stripped input (brain) refuse a volume that does not look
    # skull-stripped unless a mask is given (``skullstrip.check_skull_stripped``); False skips the check.
    skull_check: bool = True
    skull_strip: Optional[str] = None  # "hd-bet": extract the brain first when no mask is given
    # An input far from the model's calibration volumes (``input_fit``) is refused; False: warned only.
    fit_check: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse impossible values at once, before any work (the CLI and the Slicer logic both build
        these settings first). Model-dependent limits (the noise level's) are checked in ``inference_params``."""
        def whole(name, value, low, high=None):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"{name} must be a whole number, got {value!r}.")
            if value < low or (high is not None and value > high):
                limit = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise InputError(f"{name} must be {limit}, got {value}.")

        def non_negative(name, value):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InputError(f"{name} must be a number, got {value!r}.")
            if not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number of at least 0, got {value}.")

        whole("stages", self.stages, 1)
        whole("noise level", self.noise_level, 1)
        whole("ensemble size", self.ensemble, 1)
        whole("batch size", self.batch_size, 1)
        whole("seed", self.seed, 0, MAX_SEED)
        non_negative("threshold", self.threshold)
        non_negative("minimum component size (mm3)", self.min_component_mm3)
        non_negative("blur (mm)", self.blur_mm)
        if self.mode is not None and self.mode not in ("multi", "single"):
            raise InputError(f"mode must be 'multi' or 'single', got {self.mode!r}.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"precision must be auto, fp32 or bf16, got {self.precision!r}.")
        if not isinstance(self.device, str):
            raise InputError(f"device must be auto, cpu, cuda or mps, got {self.device!r}.")


@dataclass
class DetectionResult:
    anomaly_map: np.ndarray              # float32, input grid; normalised-intensity units, or multiples of the
                                         # volume's typical level where the model scales by volume (map_scale)
    segmentation: np.ndarray             # uint8, input grid
    counterfactual: np.ndarray           # float32, input grid, input intensity units
    uncertainty: Optional[np.ndarray]    # float32 (ensemble std), or None
    report: Dict = field(default_factory=dict)
    prepared: Optional[object] = None    # what the network saw (normalised input, foreground...): a PlacedVolume


def mps_available() -> bool:
    """Apple's GPU through torch's Metal backend (macOS 12.3 or later, a torch built with it)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str):
    """The torch device for auto, cpu, cuda, cuda:N or mps. ``auto`` is a CUDA GPU, else the CPU: Apple's mps
    only when asked for by name, since the engine runs there in fp32 only and has not been measured there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but CUDA is not available here "
                          "(no NVIDIA GPU or a CPU-only torch); use --device cpu or auto.")
    if name == "mps":
        if not mps_available():
            raise DeviceError("--device mps was asked for but Apple's mps is not available here (it needs a Mac "
                              "with Apple silicon or an AMD GPU, macOS 12.3 or later, and a torch built with MPS); "
                              "use --device cpu or auto.")
        return torch.device("mps")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or mps.")
    return torch.device(name)


def inference_params(model, settings: DetectionSettings) -> Dict:
    params = dict(DEFAULT_INFERENCE)
    params.update(model.metadata.get("inference", {}))
    settings.validate()
    if settings.stages is not None:
        params["max_stages"] = int(settings.stages)
    if settings.noise_level is not None:
        steps = int(model.metadata.get("schedule", {}).get("num_steps", 1000))
        if not 0 < settings.noise_level < steps:
            raise InputError(f"noise level must be between 1 and {steps - 1}.")
        params["noise_level"] = int(settings.noise_level)
        params["single_noise_levels"] = [int(settings.noise_level)]
    if settings.min_component_mm3 is not None:
        params["min_component_mm3"] = float(settings.min_component_mm3)
    if settings.blur_mm is not None:
        params["blur_mm"] = float(settings.blur_mm)
    if settings.mode is not None:
        params["mode"] = settings.mode
    if settings.ensemble is not None:
        params["ensemble"] = int(settings.ensemble)
    return params


def brain_input(volume: np.ndarray, geometry: Geometry, model, mask: Optional[np.ndarray],
                settings: DetectionSettings, device):
    """(mask, what the report says about skull stripping): a brain model's input must be a brain.

    A given mask is used as it is; ``skull_strip`` extracts one; otherwise the volume must look
    skull-stripped (``skullstrip.check_skull_stripped``), unless the check is turned off.
    """
    from synomaly.inference.preprocessing import check_volume
    from synomaly.inference.skullstrip import SKULL_STRIPPERS, check_skull_stripped, hd_bet_brain_mask
    from synomaly.method.presets import PRESETS

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


def check_dimensions(volume: np.ndarray, model, what: str = "the input") -> None:
    """A 2D image (one slice) is input only for a model of a 2D preset (carotid-us); the others say why not."""
    from synomaly.method.presets import PRESETS, two_d_refusal

    preset = PRESETS.get(model.preset)
    if is_2d(volume.shape) and (preset is None or not preset.two_d):
        raise InputError(two_d_refusal(model.preset or None, what, [n for n in reversed(volume.shape) if n != 1]))
    if preset is not None and preset.two_d and not is_2d(volume.shape):
        raise InputError(f"{what} is a volume of size {tuple(reversed(volume.shape))}, and the {preset.name} preset "
                         "works on 2D images, one frame at a time: give one frame (a PNG, JPEG or single-frame DICOM "
                         "file), or use a model of a 3D preset.")


def check_grey_levels(volume: np.ndarray, model) -> None:
    """A 2D model's fixed window is that of the images it learnt (8-bit B-mode: 0-255); an image on another
    scale (a 16-bit PNG of the same picture holds 257 times its values) would be all white to it."""
    from synomaly.method.presets import PRESETS

    preset = PRESETS.get(model.preset)
    window = (model.metadata.get("preprocessing") or {}).get("window")
    if preset is None or not preset.two_d or not window:
        return
    top = float(volume.max())
    if top > 4 * float(window[1]):
        raise InputError(f"the image holds grey levels up to {top:g}, and the {model.name} model works on levels "
                         f"from {window[0]:g} to {window[1]:g} (8-bit images): bring it to that scale first (a "
                         "16-bit export of an 8-bit picture: divide by 257).")


def check_organ_mask(mask: np.ndarray, model) -> None:
    """An organ preset's mask is the organ alone: a label map of several organs taken whole would make the
    whole body the organ (1,048 mL of 'liver')."""
    from synomaly.method.presets import PRESETS

    preset = PRESETS.get(model.preset)
    if preset is None or not preset.organ or mask.dtype.kind == "b":
        return
    labelled = mask[mask != 0]
    # One label, as in an accepted mask, needs no sort here: prepare_volume's mask check sorts its values once.
    if labelled.size == 0 or (labelled == labelled[0]).all():
        return
    labels = np.unique(labelled)
    if labels.size > 1:
        shown = ", ".join(f"{v:g}" for v in labels[:6]) + (", ..." if labels.size > 6 else "")
        raise InputError(f"the {preset.organ} mask holds {labels.size} labels ({shown}): a label map of several "
                         f"structures; give the {preset.organ} alone (e.g. from {preset.mask_source}).")


def area_report(segmentation: np.ndarray, geometry: Geometry) -> Dict:
    """For a 2D image: the anomalous area in pixels, and in mm^2 where the pixel spacing is known."""
    from synomaly.inference.vessel_disc import spacing_known

    axis = list(segmentation.shape).index(1)
    in_plane = [s for i, s in enumerate(reversed(geometry.spacing)) if i != axis]
    pixels = int(np.count_nonzero(segmentation))
    known = spacing_known(in_plane)
    return {"anomalous_area_px": pixels, "pixel_spacing_known": known,
            "anomalous_area_mm2": float(pixels * in_plane[0] * in_plane[1]) if known else None}


def _network_phase(volume, prepared, indices, model, settings: DetectionSettings, params: Dict, device, precision,
                   report_progress, cancel):
    """The diffusion stages on the chosen slices: per ensemble draw, the difference between input and
    counterfactual in the reoriented volume, and the counterfactual volume in the input's grid and units
    (``volume``, ``prepared`` and ``indices``: those of the foreground's box)."""
    import torch

    from synomaly.inference.multistage import MonotoneProgress, StageSettings, middle, run_single_stage, run_stages
    from synomaly.inference.runtime import autocast, prepare_network
    from synomaly.method.schedule import DiffusionSchedule

    network = prepare_network(model.network, device)
    schedule = DiffusionSchedule(**model.metadata["schedule"])
    k = int(params["ensemble"])
    batch_size = settings.batch_size if settings.batch_size is not None else (32 if device.type == "cuda" else 2)
    shape = prepared.normalised.shape
    diffs = np.zeros((k,) + shape, dtype=np.float32)
    # The counterfactual starts as a float32 copy of the input and takes the network's estimates on the
    # processed foreground through a reoriented view: no second volume of estimates.
    counterfactual_volume = volume.astype(np.float32)
    counterfactual_view = prepared.orientation.apply(counterfactual_volume)
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
        with autocast(device, precision):
            meter = MonotoneProgress()

            def network_progress(done, total, message):
                report_progress(0.05 + 0.85 * meter(done, total), message)

            if params["mode"] == "multi":
                result = run_stages(network, schedule, images, masks, stage, batch_size, generator,
                                    progress=network_progress, cancel=cancel)
                counterfactual, stages_per_slice = result.counterfactual, result.stages
            else:
                counterfactual = run_single_stage(network, schedule, images, params["single_noise_levels"],
                                                  batch_size, generator, progress=network_progress, cancel=cancel)
                stages_per_slice = [len(params["single_noise_levels"])] * images.shape[0]
        # The difference is taken at the network's resolution and then upsampled: comparing the
        # full-resolution input with an upsampled prediction would flag every detail lost by resizing.
        residual = (middle(images) - counterfactual.float()) * masks
        del images, masks, counterfactual
        n = len(indices)
        # Back to the volume's grid a few slices at a time, so that the full-size temporaries stay small.
        for start in range(0, n, SLICES_PER_CHUNK):
            part = indices[start:start + SLICES_PER_CHUNK]
            outside = ~prepared.foreground[part]
            x0 = prepared.normalised[part]
            estimate = np.zeros(x0.shape, dtype=np.float32)
            for draw in range(k):
                first = draw * n + start
                r = prepared.frame.from_network(residual[first:first + len(part)], shape[1:], 0.0)
                r[outside] = 0.0
                estimate += np.clip(x0 - r, -1.0, 1.0)
                diffs[draw][part] = params["direction"] * r if params["signed"] else np.abs(r)
            estimate /= k
            counterfactual_view[part] = np.where(outside, counterfactual_view[part],
                                                 prepared.intensity.inverse(estimate))
        del residual
    return diffs, counterfactual_volume, stages_per_slice


def _ensemble_maps(diffs, prepared, params: Dict, device):
    """Each draw's difference blurred into a map inside the foreground; their mean, and their spread for an
    ensemble (None for one draw)."""
    from synomaly.inference.postprocessing import blur_map

    k = len(diffs)
    fg = prepared.foreground
    blur_device = device if device.type == "cuda" else None  # scipy's one core would be the GPU run's slowest step
    maps = []
    for d in diffs:
        if params["signed"]:
            np.clip(d, 0, None, out=d)
        blurred = blur_map(d, params["blur_mm"], prepared.spacing_zyx, blur_device)
        blurred *= fg
        maps.append(blurred)
    anomaly_map = maps[0] if k == 1 else np.mean(maps, axis=0).astype(np.float32)
    uncertainty = np.std(maps, axis=0).astype(np.float32) if k > 1 else None
    del maps
    return anomaly_map, uncertainty


def detect(volume: np.ndarray, geometry: Geometry, model, mask: Optional[np.ndarray] = None,
           settings: Optional[DetectionSettings] = None,
           progress: Optional[Callable[[float, str], None]] = None,
           cancel: Optional[Callable[[], bool]] = None,
           slices: Optional[Sequence[int]] = None) -> DetectionResult:
    """Detect anomalies in one volume. ``slices`` limits processing to these axial indices
    (of the reoriented volume; used by calibration). A model whose preset names an organ (liver-ct)
    needs ``mask``. Raises InputError, DeviceError, Cancelled.

    Everything in floating point works on the foreground's bounding box (``prepare_in_box``), which gives
    what the whole volume gives; only the outputs are whole volumes, in the input's grid."""
    from synomaly.inference.input_fit import check_fit, fit_score, intensity_profile
    from synomaly.inference.postprocessing import segment
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_in_box
    from synomaly.inference.runtime import resolve_precision
    from synomaly.method.presets import PRESETS, missing_mask_message

    settings = settings or DetectionSettings()
    params = inference_params(model, settings)
    mask_needed = missing_mask_message(model.preset)
    if mask is None and mask_needed:  # an organ preset (liver): blobs and map live inside the organ only
        raise InputError(mask_needed)
    device = resolve_device(settings.device)
    precision = resolve_precision(device, settings.precision)
    if settings.maps_only:
        threshold = float("inf")
    else:
        threshold = float(settings.threshold if settings.threshold is not None else model.threshold)
    timings = {}
    report_progress = progress or (lambda fraction, message: None)

    t0 = time.perf_counter()
    report_progress(0.0, "preprocessing")
    check_dimensions(volume, model)
    check_grey_levels(volume, model)
    if mask is not None:
        check_organ_mask(mask, model)
    mask, skull = brain_input(volume, geometry, model, mask, settings, device)
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    placed = prepare_in_box(volume, geometry, config, mask)
    del mask
    prepared, box = placed.inner, placed.box
    part = volume[box.box]
    if slices is None:
        indices = prepared.slices
    else:
        processed = set(placed.slices)
        indices = placed.local([z for z in slices if z in processed])
    reference = (model.metadata.get("calibration") or {}).get("input_reference")
    preset = PRESETS.get(model.preset)
    # The box holds the whole foreground: the volume's own profile. The fluid order only where it is compared
    # (or a reference is being made: calibration of a model that has none yet).
    fluid = preset is not None and preset.skull_stripped and (
        not reference or "fluid_order" in reference.get("features", {}))
    profile = intensity_profile(prepared, brain=fluid)
    check_fit(fit_score(profile, reference), reference, model.name, settings.fit_check)  # before the network's work
    timings["preprocess_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    diffs, counterfactual, stages_per_slice = _network_phase(part, prepared, indices, model, settings, params,
                                                             device, precision, report_progress, cancel)
    timings["network_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report_progress(0.92, "post-processing")
    anomaly_map, uncertainty, level = _box_maps(diffs, prepared, indices, params, device)
    del diffs
    if not np.isfinite(anomaly_map).all():  # never a confident "0 mL" from NaN: NaN exceeds no threshold
        raise ModelFileError(f"the model {model.name} ({model.model_id}) gave NaN or infinite anomaly scores on this "
                             f"input (precision {precision}); try --precision fp32, and if that fails too, the model "
                             "is unusable: train it again.")
    if level is not None:
        profile["change"] = level
    fit = fit_score(profile, reference)
    fit_warnings = check_fit(fit, reference, model.name, settings.fit_check)
    voxel_mm3 = geometry.voxel_volume_mm3
    # Thresholding and 26-connected labelling do not depend on the axis order, so they run in the
    # input's grid, where the components' centres are reported.
    seg, comps = segment(anomaly_map, threshold, params["min_component_mm3"], voxel_mm3,
                         origin=[s.start for s in box.box])
    in_fg = prepared.orientation.invert(prepared.foreground)
    max_score = float(anomaly_map.max())  # never negative: the zeros around the box do not change it
    mean_score = float(anomaly_map[in_fg].mean()) if in_fg.any() else 0.0
    anomaly_map, seg = box.place(anomaly_map, 0.0), box.place(seg, 0)
    uncertainty = box.place(uncertainty, 0.0) if uncertainty is not None else None
    counterfactual = box.place(counterfactual, volume)
    timings["postprocess_s"] = time.perf_counter() - t0
    report = {
        "anomalous_volume_ml": float(seg.sum() * voxel_mm3 / 1000.0),
        "n_components": len(comps),
        "components": comps,
        "max_score": max_score,
        "mean_score": mean_score,
        "threshold": threshold,
        "threshold_source": ("none: maps only" if settings.maps_only else
                             "user" if settings.threshold is not None else "model calibration"),
        "slices_processed": len(indices),
        "mean_stages": float(np.mean(stages_per_slice)) if stages_per_slice else 0.0,
        "map_level": level,
        "settings": dict(params, seed=int(settings.seed), device=str(device), precision=precision),
        "skull_check": skull,
        "input_fit": fit,
        "warnings": fit_warnings,
        "model": {"name": model.name, "model_id": model.model_id},
        "engine": {"name": "synomaly", "version": __version__},
        "timings_s": {key: round(v, 3) for key, v in timings.items()},
    }
    if is_2d(volume.shape):
        report.update(area_report(seg, geometry))
    report_progress(1.0, "done")
    return DetectionResult(anomaly_map, seg, counterfactual, uncertainty, report, placed)


def _box_maps(diffs, prepared, indices, params: Dict, device):
    """The anomaly map and its spread (None for one draw) in the input's grid of ``prepared``'s volume (the
    box), with the border rim cleared and the volume's scale applied; and the map's typical level."""
    from synomaly.inference.postprocessing import inner_region, scale_by_volume, typical_level

    fg = prepared.foreground
    fine = None
    if float(params["fine_gain"]) > 0:  # the same maps at the fine blur (``DEFAULT_INFERENCE``)
        fine = _ensemble_maps(diffs, prepared, dict(params, blur_mm=params["fine_blur_mm"]), device)[0]
    anomaly_map, uncertainty = _ensemble_maps(diffs, prepared, params, device)
    if float(params["rim_mm"]) > 0:
        inner = inner_region(fg, float(params["rim_mm"]), prepared.spacing_zyx)
        anomaly_map *= inner
        if fine is not None:
            fine *= inner
    if params["map_scale"] == "volume" and indices:
        level = scale_by_volume(anomaly_map, uncertainty, fg, indices)
        if fine is not None:
            scale_by_volume(fine, None, fg, indices)
    else:
        level = typical_level(anomaly_map, fg, indices) if indices else None
    if fine is not None:
        fine *= float(params["fine_gain"])
        np.maximum(anomaly_map, fine, out=anomaly_map)
        del fine
    orient = prepared.orientation
    anomaly_map = np.ascontiguousarray(orient.invert(anomaly_map))
    uncertainty = np.ascontiguousarray(orient.invert(uncertainty)) if uncertainty is not None else None
    return anomaly_map, uncertainty, level
