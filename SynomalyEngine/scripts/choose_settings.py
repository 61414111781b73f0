"""Choose inference settings for a trained model without development-case labels.

Each candidate is calibrated on the model's held-out healthy slices (the training split, rebuilt
from the stored settings), then measured on the tumour slices of the TRAINING patients (never seen
in training: only their healthy slices were). Prints AUPRC and Dice at the calibrated threshold for
several false-positive targets, next to the intensity baseline calibrated on the same voxels.

    python SynomalyEngine/scripts/choose_settings.py runs/brain-flair.safetensors --out runs/choice.json
"""
import argparse
import json
import time

import numpy as np
from brain_flair_recipe import TRAINING_CASES

from synomaly.baseline import baseline_for, calibrate_threshold
from synomaly.detection import DetectionSettings, detect
from synomaly.metrics import auprc, dice
from synomaly.model_file import load_model
from synomaly.preprocessing import PreprocessConfig, prepare_volume
from synomaly.training import extract_slices, find_cases, healthy_validation_scores, settings_from_model

CANDIDATES = {
    "multi-t200": {},
    "single-t200": {"mode": "single", "single_noise_levels": [200]},
    "multi-t100": {"noise_level": 100},
    "multi-t300": {"noise_level": 300},
    "multi-t200-abs": {"signed": False},
    "multi-t200-ens3": {"ensemble": 3},
    "multi-t200-blur3": {"blur_mm": 3.0},
}
TARGETS = (0.01, 0.005, 0.002)


def tumour_slices(case, config):
    prepared = prepare_volume(case.image, case.geometry, config, case.mask)
    lesion = prepared.orientation.apply(case.labels)
    zs = [z for z in prepared.slices if lesion[z].any()]
    region = np.zeros(lesion.shape, dtype=bool)
    region[zs] = True
    region = prepared.orientation.invert(region & prepared.foreground)
    return prepared, zs, region


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = load_model(args.model)
    base_inference = dict(model.metadata["inference"])
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    cases = find_cases(TRAINING_CASES)
    split = extract_slices(cases, settings_from_model(model.metadata), config).validation
    regions = [tumour_slices(c, config) for c in cases]
    baselines = [baseline_for(p) for p, _, _ in regions]
    results = {}
    for name in args.candidates:
        t0 = time.time()
        model.metadata["inference"] = dict(base_inference, **CANDIDATES[name])
        healthy, healthy_base = healthy_validation_scores(model, cases, split, "cpu")
        thresholds = {t: calibrate_threshold(healthy, t) for t in TARGETS}
        base_thresholds = {t: calibrate_threshold(healthy_base, t) for t in TARGETS}
        rows = []
        for case, (prepared, zs, region), base in zip(cases, regions, baselines):
            result = detect(case.image, case.geometry, model, case.mask,
                            DetectionSettings(device="cpu", threshold=thresholds[0.01]), slices=zs)
            gt = case.labels & region
            row = {"case": case.name, "auprc": auprc(result.anomaly_map, gt, region),
                   "baseline_auprc": auprc(base, gt, region)}
            for t in TARGETS:
                row[f"dice@{t}"] = dice((result.anomaly_map > thresholds[t]) & region, gt)
                row[f"baseline_dice@{t}"] = dice((base > base_thresholds[t]) & region, gt)
            rows.append(row)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"}
        results[name] = {"inference": model.metadata["inference"], "thresholds": thresholds, "cases": rows,
                         "mean": mean, "seconds": round(time.time() - t0, 1)}
        print(f"{name:18s} " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()) + f" ({time.time() - t0:.0f} s)",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
