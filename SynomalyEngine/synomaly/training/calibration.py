"""Calibration: the anomaly threshold that a target share of healthy foreground voxels exceeds, and the
intensity baseline's threshold on the same voxels, so that evaluations compare like with like."""
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from synomaly.errors import InputError
from synomaly.training.cases import TrainingCase, find_cases
from synomaly.training.settings import TrainingSettings, check_number
from synomaly.training.slices import extract_slices


def _healthy_values(model, case: TrainingCase, device, cancel, slices=None) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """Our map's values and the baseline's scores on one case's healthy foreground voxels: of ``slices``
    (reoriented axial indices) when given, else of the whole volume; labelled voxels never count. Third,
    the volume's input profile (``input_fit``), from which the model's input reference is made."""
    from synomaly.inference.baseline import baseline_for, lesion_direction
    from synomaly.inference.detection import DetectionSettings, detect

    # The model is calibrated on what it was trained on, stripped or not, near its old reference or not.
    result = detect(case.image, case.geometry, model, case.mask,
                    DetectionSettings(device=str(device), maps_only=True, skull_check=False, fit_check=False),
                    cancel=cancel, slices=slices)
    prepared = result.prepared
    region = prepared.foreground.copy()
    if slices is not None:
        chosen = np.zeros(region.shape, dtype=bool)
        chosen[list(slices)] = True
        region &= chosen
    region = prepared.orientation.invert(region)  # the map and the baseline's scores are in the input's grid
    if case.labels is not None:
        region &= ~(case.labels > 0)
    scores = baseline_for(prepared, direction=lesion_direction(model.metadata))
    return result.anomaly_map[region], scores[region], result.report["input_fit"]["profile"]


def _joined(triples) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    return (np.concatenate([o for o, _, _ in triples]), np.concatenate([b for _, b, _ in triples]),
            [p for _, _, p in triples])


def healthy_validation_scores(model, cases: Sequence[TrainingCase], validation: Dict[int, List[int]], device,
                              cancel: Optional[Callable[[], bool]] = None) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Our anomaly-map values and the intensity baseline's scores on held-out healthy foreground voxels, and
    each volume's input profile."""
    triples = [_healthy_values(model, cases[ci], device, cancel, slices=val) for ci, val in validation.items() if val]
    if not triples:
        raise InputError("no healthy validation slices to calibrate on; give more healthy volumes "
                         "or raise validation_fraction.")
    return _joined(triples)


def healthy_volume_scores(model, cases: Sequence[TrainingCase], device="auto",
                          cancel: Optional[Callable[[], bool]] = None) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Our map and the baseline's scores on every unlabelled foreground voxel of whole volumes, and each
    volume's input profile.

    For calibrating on patients the model never saw: held-out slices of training patients give maps
    with lighter tails than a new patient's, and a threshold set on them lets through several times
    its target on new patients (measured: 0.2 % became 2 %)."""
    triples = [_healthy_values(model, case, device, cancel) for case in cases]
    if not triples:
        raise InputError("no volumes to calibrate on.")
    return _joined(triples)


def calibrate(model, cases: Sequence[TrainingCase], validation: Dict[int, List[int]], target_fpr: float,
              device, baseline_target_fpr: Optional[float] = None,
              cancel: Optional[Callable[[], bool]] = None) -> Dict:
    """Anomaly threshold = the map value exceeded by ``target_fpr`` of held-out healthy foreground voxels.

    The intensity baseline's threshold is calibrated on the same voxels (at its own target when one was
    chosen for it by the same procedure), so evaluations compare like with like.
    """
    from synomaly.inference.baseline import calibrate_threshold, lesion_direction
    from synomaly.inference.input_fit import reference_from

    base_fpr = target_fpr if baseline_target_fpr is None else float(baseline_target_fpr)
    ours, base, profiles = healthy_validation_scores(model, cases, validation, device, cancel)
    return {"threshold": float(calibrate_threshold(ours, target_fpr)), "target_fpr": target_fpr,
            "voxels": int(ours.size), "baseline_threshold": float(calibrate_threshold(base, base_fpr)),
            "baseline_target_fpr": base_fpr, "baseline_median_size": 5,
            "baseline_direction": lesion_direction(model.metadata),
            "input_reference": reference_from(profiles, f"held-out slices of {len(profiles)} training volumes")}


def settings_from_model(metadata: Dict) -> TrainingSettings:
    saved = dict(metadata["training"]["settings"])
    for key in ("channel_mult", "attention_resolutions"):
        saved[key] = tuple(saved[key])
    return TrainingSettings(**{k: v for k, v in saved.items() if k in TrainingSettings.__dataclass_fields__})


def recalibrate(model_path, healthy, output=None, inference: Optional[Dict] = None, target_fpr=None,
                device: str = "auto", baseline_target_fpr=None) -> Path:
    """Calibrate a trained model again on the same held-out healthy slices (the split is reproducible
    from the stored settings), optionally with new inference defaults; writes ``output`` (default: in place)."""
    from synomaly.files.model_file import load_model, save_model
    from synomaly.inference.detection import resolve_device
    from synomaly.inference.preprocessing import PreprocessConfig

    model = load_model(model_path)
    settings = settings_from_model(model.metadata)
    cases = find_cases(healthy)
    data = extract_slices(cases, settings, PreprocessConfig.from_dict(model.metadata["preprocessing"]))
    if inference:
        model.metadata["inference"].update(inference)
    fpr = settings.target_fpr if target_fpr is None else target_fpr
    check_number(fpr, "target false-positive rate", 0.0, 1.0)
    model.metadata["calibration"] = calibrate(model, cases, data.validation, fpr, resolve_device(device),
                                              baseline_target_fpr)
    model.metadata["threshold"] = model.metadata["calibration"]["threshold"]
    return save_model(Path(output or model_path), model.network.cpu(), model.metadata)
