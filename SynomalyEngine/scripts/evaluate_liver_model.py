"""Evaluate a liver CT model on the tumour slices of the recipe's evaluation cases, next to HU thresholds.

    python SynomalyEngine/scripts/evaluate_liver_model.py runs/liver-ct.safetensors --out runs/liver-eval.json

Per case, on the axial slices that hold tumour (and that detection processes), inside the liver:
Dice at the calibrated threshold, AUPRC of the map, and the false-positive rate on the healthy liver of
those slices; for ours and for two baselines, each thresholded at the same healthy false-positive target
on the same held-out healthy training slices as the model (nothing is chosen on these labels):
- "HU threshold": darkness alone, ``HU < t`` inside the liver (the input clipped to the preset's window); for a
  model of lesions either way (liver-ct v2), the distance from the liver's median HU, ``|HU - median| > t``;
- "HU median 5": the engine's baseline, the same after a 5 x 5 x 5 median filter (``baseline.baseline_for``);
- "HU median 5, enhanced": the same, its threshold from the contrast-enhanced training patient's held-out
  slices alone (ircad17), without the unenhanced TotalSegmentator CT, whose darker liver (about 46 HU
  against 100-115) pulls a common threshold down: how much of the baseline's Dice the mix of phases costs.
The oracle Dice (best threshold per case, chosen with its labels) is printed for context, never as a result.
"""
import argparse
import json
import time

import numpy as np
from liver_ct_recipe import EVALUATION, case_files, write_training_csv

from synomaly.inference.baseline import baseline_for, calibrate_threshold, lesion_direction
from synomaly.inference.detection import DetectionSettings, detect
from synomaly.evaluation.metrics import auprc, best_threshold_dice, dice
from synomaly.files.model_file import load_model
from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume
from synomaly.training.calibration import settings_from_model
from synomaly.training.cases import find_cases
from synomaly.training.slices import extract_slices
from synomaly.files.volume_io import read_volume

# name -> (median filter size, the training cases whose held-out slices set the threshold; None: all)
BASELINES = {"HU threshold": (1, None), "HU median 5": (5, None), "HU median 5, enhanced": (5, ("ircad17",))}


def validation_region(prepared, slices):
    region = np.zeros(prepared.foreground.shape, dtype=bool)
    region[slices] = True
    return prepared.orientation.invert(region & prepared.foreground)


def baseline_thresholds(model, config, csv_path):
    """Each baseline's threshold on the model's held-out healthy slices, at the model's target FPR."""
    cases = find_cases([csv_path])
    validation = extract_slices(cases, settings_from_model(model.metadata), config).validation
    direction = lesion_direction(model.metadata)
    target = model.metadata["calibration"]["baseline_target_fpr"]
    scores = {name: [] for name in BASELINES}
    for index, slices in validation.items():
        if not slices:
            continue
        case = cases[index]
        prepared = prepare_volume(case.image, case.geometry, config, case.mask)
        region = validation_region(prepared, slices)
        for name, (size, only) in BASELINES.items():
            if only is None or case.name in only:
                scores[name].append(baseline_for(prepared, size, direction)[region])
    return {name: float(calibrate_threshold(np.concatenate(v), target)) for name, v in scores.items()}


def measure(score_map, segmentation, gt, region):
    healthy = region & ~gt
    return {"dice": dice(segmentation & region, gt), "auprc": auprc(score_map, gt, region),
            "fpr_healthy_liver": float((segmentation & healthy).sum() / max(1, healthy.sum())),
            "oracle_dice": best_threshold_dice(score_map, gt, region).dice}


def evaluate_case(model, config, name, thresholds, direction, device):
    files = case_files(name)
    image, geometry = read_volume(files["image"])
    liver = read_volume(files["mask"])[0] > 0
    tumour = read_volume(files["label"])[0] > 0
    prepared = prepare_volume(image, geometry, config, liver)
    lesion = prepared.orientation.apply(tumour)
    slices = [z for z in prepared.slices if lesion[z].any()]
    all_tumour_slices = int(lesion.any(axis=(1, 2)).sum())
    t0 = time.time()
    result = detect(image, geometry, model, liver, DetectionSettings(device=device), slices=slices)
    seconds = time.time() - t0
    region = validation_region(prepared, slices)
    gt = tumour & region
    row = {"case": name, "tumour_slices": len(slices), "tumour_slices_all": all_tumour_slices,
           "tumour_voxels_left_out": int((tumour & ~region).sum()), "seconds": round(seconds, 1),
           "ours": measure(result.anomaly_map, result.segmentation > 0, gt, region)}
    for base, (size, _) in BASELINES.items():
        scores = baseline_for(prepared, size, direction)
        row[base] = measure(scores, scores > thresholds[base], gt, region)
    return row


def hu_of(threshold, window, direction):
    """The baseline's threshold in HU: below it (direction -1, the negated window-normalised score), or
    the distance from the liver's median HU beyond which a voxel is flagged (direction 0, two-sided)."""
    lo, hi = window
    if direction == 0:
        return threshold / 2.0 * (hi - lo)
    return lo + (1.0 - threshold) / 2.0 * (hi - lo)


def hu_words(threshold, window, direction):
    value = hu_of(threshold, window, direction)
    return f"|HU - liver median| > {value:.1f}" if direction == 0 else f"HU < {value:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_model(args.model)
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    direction = lesion_direction(model.metadata)
    csv_path = write_training_csv()
    thresholds = baseline_thresholds(model, config, csv_path)
    stored = model.metadata["calibration"]["baseline_threshold"]
    assert abs(thresholds["HU median 5"] - stored) < 1e-6, (thresholds, stored)
    rows = [dict(evaluate_case(model, config, name, thresholds, direction, args.device), note=note)
            for name, note in EVALUATION]
    methods = ["ours"] + list(BASELINES)
    print(f"model {model.name} ({model.model_id}), threshold {model.threshold:.4f} at "
          f"{model.metadata['calibration']['target_fpr']:.1%} healthy FPR; baseline thresholds: "
          + ", ".join(f"{k} {v:.4f} ({hu_words(v, config.window, direction)})" for k, v in thresholds.items()))
    print("| case | slices | " + " | ".join(f"{m} {k}" for k in ("Dice", "AUPRC", "FPR") for m in methods) + " |")
    for row in rows:
        cells = [f"{row['case']} ({row['note']})", f"{row['tumour_slices']}/{row['tumour_slices_all']}"]
        for key in ("dice", "auprc", "fpr_healthy_liver"):
            cells += [f"{100 * row[m][key]:.2f} %" if key.startswith("fpr") else f"{row[m][key]:.3f}"
                      for m in methods]
        print("| " + " | ".join(cells) + " |")
    print("oracle Dice (labels choose the threshold; not a result): " + "; ".join(
        f"{row['case']}: " + ", ".join(f"{m} {row[m]['oracle_dice']:.3f}" for m in methods) for row in rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": {"name": model.name, "model_id": model.model_id, "threshold": model.threshold,
                                 "calibration": model.metadata["calibration"]},
                       "baseline_thresholds": thresholds,
                       "baseline_thresholds_hu": {k: hu_of(v, config.window, direction)
                                                          for k, v in thresholds.items()},
                       "cases": rows}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
