"""Evaluation against labelled cases: our detection and the intensity baseline, side by side.

Every figure of ours comes with the same figure for the plain baseline (median-filtered normalised
intensity), whose threshold was calibrated by training on the same healthy voxels as the model's.
Nothing here is tuned on the test labels; the one label-tuned figure, the best-threshold Dice, is
named an oracle wherever it appears. Slice-wise figures use axial slices of the reoriented volume,
so they mean the same for any acquisition orientation.
"""
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from synomaly import __version__
from synomaly.errors import InputError, OutputError
from synomaly.evaluation import metrics as M
from synomaly.evaluation.cases import EvalCase, find_eval_cases
from synomaly.evaluation.report import ORACLE_LABEL, THRESHOLD_METRICS, jsonable, markdown, summarise
from synomaly.files.geometry import Geometry, grid_difference
from synomaly.files.outputs import our_report
from synomaly.files.output_set import OutputFolder, OutputSet
from synomaly.files.library_messages import library_messages
from synomaly.files.volume_io import atomic_write_bytes, read_volume

BASELINE_METHOD = ("3D median filter of the normalised input intensity (negated for models of darker lesions; its "
                   "distance from the foreground's median for models of either), thresholded inside the foreground")


def _axial_axis(shape, geometry: Geometry) -> int:
    from synomaly.files.geometry import Orientation

    return int(Orientation.for_image(shape, geometry).perm[0])


def crop_axial(image: np.ndarray, geometry: Geometry, label: np.ndarray, mask: Optional[np.ndarray],
               max_slices: int) -> Tuple[np.ndarray, Geometry, np.ndarray, Optional[np.ndarray], Dict]:
    """At most ``max_slices`` axial slices centred on the lesion, with the origin moved to match.

    For quick runs on real data. The axial axis comes from the geometry (not always numpy axis 0);
    without lesion the block is centred on the volume. Returns the cropped image, geometry, label,
    mask and the block ({"axis", "start", "stop"}, numpy indices of the input).
    """
    if isinstance(max_slices, bool) or int(max_slices) != max_slices or max_slices < 1:
        raise InputError(f"max_slices must be a positive whole number, got {max_slices!r}.")
    axis = _axial_axis(image.shape, geometry)
    n = image.shape[axis]
    keep = min(int(max_slices), n)
    lesion = np.flatnonzero(np.any(label > 0, axis=tuple(a for a in range(3) if a != axis)))
    centre = 0.5 * (lesion[0] + lesion[-1]) if lesion.size else 0.5 * (n - 1)
    start = int(min(max(int(math.floor(centre + 0.5)) - keep // 2, 0), n - keep))
    stop = start + keep
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    index = tuple(index)
    itk_axis = 2 - axis
    shift = geometry.direction_matrix[:, itk_axis] * geometry.spacing[itk_axis] * start
    origin = tuple(float(o + s) for o, s in zip(geometry.origin, shift))
    cropped = Geometry(geometry.spacing, origin, geometry.direction)
    block = {"axis": axis, "start": start, "stop": stop}
    return (np.ascontiguousarray(image[index]), cropped, np.ascontiguousarray(label[index]),
            None if mask is None else np.ascontiguousarray(mask[index]), block)


def case_metrics(anomaly_map, segmentation, gt, foreground, spacing, volume=None, counterfactual=None) -> Dict:
    """All per-case figures of one method; arrays are (z, y, x) with ``array[z]`` axial.

    ``spacing`` is (x, y, z) in mm of these arrays. Lesion is ``gt > 0`` everywhere, also outside
    the foreground (a missed lesion there still counts); AUPRC, AUROC and FPR use the foreground
    voxels only. ``segmentation=None`` (no calibrated threshold) gives the threshold-free figures
    only, the others as None. SSIM needs ``volume`` and ``counterfactual`` (input intensities).
    """
    scores = np.asarray(anomaly_map, dtype=np.float32)
    gt = np.asarray(gt) > 0
    foreground = np.asarray(foreground).astype(bool, copy=False)
    for name, arr in (("foreground", foreground), ("score map", scores)):
        if arr.shape != gt.shape:
            raise InputError(f"The {name} has shape {arr.shape}, the ground truth {gt.shape}.")
    out: Dict = {"auprc": M.auprc(scores, gt, foreground), "auroc": M.auroc(scores, gt, foreground)}
    oracle = M.best_threshold_dice(scores, gt)
    out["oracle_best_threshold_dice"] = oracle.dice
    out["oracle_threshold"] = oracle.threshold
    if segmentation is None:
        out.update({k: None for k in THRESHOLD_METRICS})
        out["counts"] = None
    else:
        seg = np.asarray(segmentation) > 0
        if seg.shape != gt.shape:
            raise InputError(f"The segmentation has shape {seg.shape}, the ground truth {gt.shape}.")
        counts = M.confusion_counts(seg, gt, foreground)
        out.update(M.ratios_from_counts(counts))
        out["hd95_mm"] = M.hd95(seg, gt, spacing)
        out["slice_dice"] = M.slice_dice(seg, gt)
        out["counts"] = counts
    out["ssim_healthy_slices"] = (M.ssim_healthy_slices(volume, counterfactual, gt, foreground)
                                  if volume is not None and counterfactual is not None else None)
    return out


def _model_info(model) -> Dict:
    return {"name": model.name, "model_id": model.model_id,
            "path": str(model.path) if getattr(model, "path", None) else None}


def _baseline_calibration(model) -> Dict:
    from synomaly.inference.baseline import lesion_direction

    calibration = model.metadata.get("calibration") or {}
    threshold = calibration.get("baseline_threshold")
    size = int(calibration.get("baseline_median_size", 5))
    direction = int(calibration.get("baseline_direction", lesion_direction(model.metadata)))
    if threshold is None:
        return {"method": BASELINE_METHOD, "threshold": None, "median_size": size, "direction": direction,
                "threshold_source": "absent: the model file carries no baseline threshold, so the baseline's "
                                    "threshold-dependent figures are not reported (choosing one on the test "
                                    "cases would be dishonest); only its threshold-free AUPRC, AUROC and the "
                                    "oracle Dice are given."}
    base_fpr = calibration.get("baseline_target_fpr", calibration.get("target_fpr"))
    return {"method": BASELINE_METHOD, "threshold": float(threshold), "median_size": size, "direction": direction,
            "target_fpr": base_fpr,
            "threshold_source": "model calibration: the same healthy voxels as the model's threshold, "
                                f"at a healthy false-positive rate of {base_fpr} (model: "
                                f"{calibration.get('target_fpr')})"}


def _panel(volume, counterfactual, anomaly_map, segmentation, gt, foreground, spacing_xyz, path) -> None:
    """Rows through the lesion (up to three) plus the slice with the most false positives, if any.

    ``overview.render_overview`` picks slices from our segmentation only, which can miss the lesion;
    here the rows are chosen from the ground truth, with one map scale for all. The arrays are
    already axial (reoriented like the network's input).
    """
    from synomaly.files.overview import choose_slices, compose_overview, save_png

    seg = segmentation > 0
    gt_z = np.flatnonzero(gt.any(axis=(1, 2)))
    rows = choose_slices(volume, gt, 3) if gt_z.size else choose_slices(volume, seg, 3)
    fp_per_slice = np.count_nonzero(seg & ~gt, axis=(1, 2))
    fp_per_slice[rows] = 0
    if gt_z.size and fp_per_slice.max() > 0:
        rows = sorted(rows + [int(np.argmax(fp_per_slice))])
    inside = anomaly_map[foreground] if foreground.any() else anomaly_map.ravel()
    map_max = float(np.percentile(inside, 99.9)) if inside.size else 0.0
    if not map_max > 0:
        map_max = float(inside.max()) if inside.size and inside.max() > 0 else 1.0
    overview = compose_overview(volume, counterfactual, anomaly_map, segmentation, ground_truth=gt,
                                geometry=Geometry.identity(spacing_xyz), map_max=map_max, slices=rows)
    save_png(overview.image, path)


def _read_case(case: EvalCase):
    image, geometry = read_volume(case.image_path)
    label, label_geometry = read_volume(case.label_path)
    difference = grid_difference(label.shape, label_geometry, image.shape, geometry)
    if difference:
        raise InputError(f"{case.label_path}: the label does not lie on the image's voxel grid ({difference}); "
                         "resample the label onto the image.")
    if label.min() < 0 or not np.array_equal(label, np.round(label)):
        raise InputError(f"{case.label_path}: holds values from {float(label.min()):g} to {float(label.max()):g}, not "
                         "whole-number classes (0 background): a soft label or a probability map would count every "
                         "voxel above 0 as lesion; threshold it into a mask first.")
    mask = None
    if case.mask_path is not None:
        mask, mask_geometry = read_volume(case.mask_path)
        difference = grid_difference(mask.shape, mask_geometry, image.shape, geometry)
        if difference:
            raise InputError(f"{case.mask_path}: the mask does not lie on the image's voxel grid ({difference}); "
                             "resample the mask onto the image.")
    return image, geometry, label, mask


def evaluate_case(case: EvalCase, model, settings, out_dir: Path, max_slices: Optional[int] = None,
                  progress: Optional[Callable[[float, str], None]] = None, cancel=None) -> Tuple[Dict, Dict]:
    """Detect on one case and measure ours and the baseline; returns (record, pooled-score arrays)."""
    from synomaly.inference.baseline import baseline_for, baseline_segmentation
    from synomaly.inference.detection import detect

    report = progress or (lambda fraction, message: None)
    t0 = time.perf_counter()
    image, geometry, label, mask = _read_case(case)
    block = None
    if max_slices is not None:
        image, geometry, label, mask, block = crop_axial(image, geometry, label, mask, max_slices)
    result = detect(image, geometry, model, mask, settings,
                    progress=lambda f, m: report(0.85 * f, f"{case.name}: {m}"), cancel=cancel)
    report(0.87, f"{case.name}: metrics")
    prepared = result.prepared
    orient = prepared.orientation
    foreground = prepared.foreground
    spacing_xyz = tuple(reversed(prepared.spacing_zyx))
    gt = orient.apply(label > 0)
    volume = orient.apply(image).astype(np.float32)
    counterfactual = orient.apply(result.counterfactual)
    ours_map = orient.apply(result.anomaly_map)
    ours_seg = orient.apply(result.segmentation)
    ours = case_metrics(ours_map, ours_seg, gt, foreground, spacing_xyz, volume, counterfactual)

    calibration = _baseline_calibration(model)
    base_scores = orient.apply(baseline_for(prepared, calibration["median_size"], calibration["direction"]))
    base_seg = (baseline_segmentation(base_scores, calibration["threshold"], foreground)
                if calibration["threshold"] is not None else None)
    baseline = case_metrics(base_scores, base_seg, gt, foreground, spacing_xyz)

    panel = f"{case.name}_panel.png"
    report(0.95, f"{case.name}: panel")
    _panel(volume, counterfactual, ours_map, ours_seg, gt, foreground, spacing_xyz, out_dir / panel)
    record = {
        "name": case.name, "image": str(case.image_path), "label": str(case.label_path),
        "mask": str(case.mask_path) if case.mask_path else None,
        "shape_zyx": list(image.shape), "spacing_xyz": list(geometry.spacing),
        "axial_block": block,
        "lesion_voxels": int(np.count_nonzero(gt)),
        "lesion_voxels_outside_foreground": int(np.count_nonzero(gt & ~foreground)),
        "foreground_voxels": int(np.count_nonzero(foreground)),
        "ours": ours, "baseline": baseline,
        "detection": {k: result.report.get(k) for k in ("threshold", "threshold_source", "anomalous_volume_ml",
                                                         "n_components", "slices_processed", "mean_stages",
                                                         "timings_s", "input_fit")},
        "panel": panel,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    pooled = {"ours": (ours_map[foreground], gt[foreground]), "baseline": (base_scores[foreground], gt[foreground])}
    return record, pooled


def _refuse_earlier(earlier: Path, overwrite: bool) -> None:
    """An earlier evaluation is replaced only when asked, and a file of that name not written by synomaly never."""
    if not earlier.exists():
        return
    if our_report(earlier) is None:
        raise OutputError(f"{earlier} exists and was not written by synomaly; synomaly replaces only its own files: "
                          "move it, or choose another -o folder.")
    if not overwrite:
        raise OutputError(f"{earlier} holds an earlier evaluation; use --overwrite to replace it, or another -o "
                          "folder.")


def evaluate(cases, model, settings=None, out_dir=".", target_fpr: float = 0.01,
             progress: Optional[Callable[[float, str], None]] = None, max_slices: Optional[int] = None,
             cancel: Optional[Callable[[], bool]] = None, overwrite: bool = False) -> Dict:
    """Evaluate ``model`` on labelled cases; write evaluation.json, evaluation.md and per-case panels.

    ``cases``: EvalCase objects or paths for ``find_eval_cases``. ``target_fpr`` is the healthy-voxel
    FPR budget the results are checked against; it tunes nothing. ``max_slices`` evaluates a block
    of at most that many axial slices around each lesion (quick runs; the intensity normalisation
    then sees only the block). Returns the dict written to evaluation.json (NaN as null, inf as "inf").
    """
    from synomaly.inference.detection import DetectionSettings, inference_params

    settings = settings or DetectionSettings()
    report = progress or (lambda fraction, message: None)
    cases = list(cases) if not isinstance(cases, (str, Path)) else [cases]
    if not cases:
        raise InputError("no evaluation cases given.")
    if not all(isinstance(c, EvalCase) for c in cases):
        cases = find_eval_cases(cases)
    if not 0.0 <= float(target_fpr) < 1.0:
        raise InputError(f"target_fpr must be in [0, 1), got {target_fpr}.")
    inference = inference_params(model, settings)
    out_dir = Path(out_dir)
    _refuse_earlier(out_dir / "evaluation.json", overwrite)
    # Panels and summaries appear together at the end; a failed run leaves nothing (see output_set).
    with OutputFolder(out_dir), OutputSet(out_dir, "evaluation") as output_set:
        evaluation = _evaluate_cases(cases, model, settings, inference, output_set, target_fpr, report,
                                     max_slices, cancel)
        text = json.dumps(evaluation, indent=2, allow_nan=False)
        atomic_write_bytes(output_set.stage(out_dir / "evaluation.json"), (text + "\n").encode("utf-8"))
        atomic_write_bytes(output_set.stage(out_dir / "evaluation.md"), markdown(evaluation).encode("utf-8"))
        output_set.commit(last=[out_dir / "evaluation.md", out_dir / "evaluation.json"])
    report(1.0, "done")
    return evaluation


def _case_weight(case: EvalCase, max_slices: Optional[int]) -> float:
    """Voxels the case will cost, from its header alone, so that progress and time left follow the work."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(case.image_path))
    try:
        with library_messages([]):
            reader.ReadImageInformation()
    except RuntimeError:
        return 1.0  # unreadable: reading it proper gives the error
    size = list(reader.GetSize()) + [1]
    slices = min(size[2], max_slices) if max_slices is not None else size[2]
    return float(max(1, size[0] * size[1] * slices))


def _evaluate_cases(cases, model, settings, inference, output_set, target_fpr, report, max_slices, cancel) -> Dict:
    """The cases one by one (panels into the set's staging folder), then the summary, as evaluate() returns it."""
    weights = [_case_weight(case, max_slices) for case in cases]
    before = np.concatenate([[0.0], np.cumsum(weights)]) / (sum(weights) * 1.01)  # the last 1 %: the summary
    records, pooled = [], {"ours": [], "baseline": []}
    for i, case in enumerate(cases):
        share = before[i + 1] - before[i]
        record, scores = evaluate_case(case, model, settings, output_set.staging, max_slices,
                                       progress=lambda f, m, i=i, share=share: report(before[i] + share * f, m),
                                       cancel=cancel)
        records.append(record)
        for method in pooled:
            pooled[method].append(scores[method])
    report(before[-1], "summary")

    baseline = _baseline_calibration(model)
    calibration = model.metadata.get("calibration") or {}
    notes = []
    if baseline["threshold"] is None:
        notes.append("The model carries no baseline threshold: baseline Dice, IoU, precision, recall, HD95, "
                     "FPR and slice Dice are not reported.")
    if max_slices is not None:
        notes.append(f"Each case is a block of at most {max_slices} axial slices around its lesion; the "
                     "figures are for that block only, not for the whole volume, and the intensity normalisation "
                     "sees only the block.")
    model_fpr = calibration.get("target_fpr")
    if model_fpr is not None and not math.isclose(float(model_fpr), float(target_fpr)):
        notes.append(f"The model was calibrated for a healthy-voxel FPR of {model_fpr}, not {target_fpr}.")
    if settings.threshold is not None:
        notes.append(f"Our threshold {settings.threshold} was set by the user, not by the model's calibration.")
    outside = sum(r["lesion_voxels_outside_foreground"] for r in records)
    if outside:
        notes.append(f"{outside} lesion voxels lie outside the foreground: they count as missed in Dice, "
                     "recall and HD95, and are outside the AUPRC/AUROC region.")
    summary = summarise(records, pooled)
    for method in ("ours", "baseline"):
        fpr = summary[method]["pooled"]["fpr_healthy"]
        summary[method]["pooled_fpr_within_target"] = (None if fpr is None or math.isnan(fpr)
                                                       else bool(fpr <= target_fpr))
    evaluation = {
        "engine": {"name": "synomaly", "version": __version__},
        "model": _model_info(model),
        "threshold": {"value": float(settings.threshold if settings.threshold is not None else model.threshold),
                      "source": "user" if settings.threshold is not None else "model calibration on "
                                + (model.metadata.get("calibration") or {}).get("method", "healthy validation voxels")
                                + f" (target FPR {model_fpr})"},
        "baseline": baseline,
        "target_fpr": float(target_fpr),
        "max_slices": max_slices,
        "settings": {"detection": asdict(settings), "inference": inference},
        "oracle_label": ORACLE_LABEL,
        "cases": records,
        "summary": summary,
        "notes": notes,
    }
    return jsonable(evaluation)

