"""Calibrate a brain model's threshold (and the baseline's) on patients it never trained on, and choose
the false-positive target on the selection patients.

Calibration patients: the recipe's fitting patients the model did not train on (its data summary names
its patients). Their healthy voxels (outside the tumour labels), over whole volumes, set both thresholds
at each target. Each pair is then applied to the selection patients (never trained on, never calibrated
on): the largest target whose healthy false-positive rate there stays within --max-fpr is written into
the model, with the inference settings named by --inference (brain_flair_candidates.INFERENCE).
Development cases are never read.

    python SynomalyEngine/scripts/calibrate_brain_model.py MODEL OUT --inference one-stage-volume-scale-blur3.5-min20 \
        --fine-blur-mm 1

The threshold is calibrated on the map alone (any fine map of MODEL is left out); ``--fine-blur-mm`` then adds the
fine map for small lesions, calibrated and chosen by ``calibrate_fine_map.py``'s rule (0: none).
"""
import argparse
import json
import time

import numpy as np
from brain_flair_candidates import INFERENCE, case_means, dice_fpr, log, volume_scores
from brain_flair_recipe import load_cases, split_patients, training_rows
from calibrate_fine_map import add_fine_map


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--inference", default="default", choices=sorted(INFERENCE))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.015, 0.02, 0.03])
    parser.add_argument("--max-fpr", type=float, default=0.01)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pack", default=None)
    parser.add_argument("--report", default=None, help="write the measurements here (JSON)")
    parser.add_argument("--fine-blur-mm", type=float, default=0.0, help="add a fine map of this blur (0: none)")
    args = parser.parse_args()
    from synomaly.inference.baseline import baseline_segmentation, calibrate_threshold, lesion_direction
    from synomaly.files.model_file import load_model, save_model
    from synomaly.inference.postprocessing import segment
    from synomaly.training.calibration import healthy_volume_scores

    model = load_model(args.model)
    model.metadata["inference"] = dict(model.metadata["inference"], **INFERENCE[args.inference], fine_gain=0.0)
    trained_on = {c["case"] for c in model.metadata["training"]["data"]["cases"]}
    fitting, selection = split_patients(training_rows())
    rows = [row for row in fitting if row["case"] not in trained_on]
    t0 = time.time()
    ours, base, _ = healthy_volume_scores(model, load_cases(rows, args.pack), args.device)
    log(f"healthy voxels of {len(rows)} calibration patients: {ours.size:,} ({time.time() - t0:.0f} s)")
    thresholds = {q: (float(calibrate_threshold(ours, q)), float(calibrate_threshold(base, q))) for q in args.targets}
    min_mm3 = float(model.metadata["inference"]["min_component_mm3"])
    per_case = []
    for case in load_cases(selection, args.pack):
        our_map, base_map, gt, prepared = volume_scores(model, case, args.device)
        fg = prepared.foreground
        voxel = float(np.prod(prepared.spacing_zyx))
        row = {"case": case.name}
        for q, (t_ours, t_base) in thresholds.items():
            seg = segment(our_map, t_ours, min_mm3, voxel)[0].astype(bool)
            row[f"dice@{q}"], row[f"fpr@{q}"] = dice_fpr(seg, gt, fg)
            bseg = baseline_segmentation(base_map, t_base, fg).astype(bool)
            row[f"baseline_dice@{q}"], row[f"baseline_fpr@{q}"] = dice_fpr(bseg, gt, fg)
        per_case.append(row)
    mean = case_means(per_case)
    for q in args.targets:
        log(f"target {q:.3f}: threshold {thresholds[q][0]:.4f}; selection patients Dice {mean[f'dice@{q}']:.3f} "
            f"FPR {mean[f'fpr@{q}']:.4f} | baseline Dice {mean[f'baseline_dice@{q}']:.3f} "
            f"FPR {mean[f'baseline_fpr@{q}']:.4f}")
    within = [q for q in args.targets if mean[f"fpr@{q}"] <= args.max_fpr]
    target = max(within) if within else min(args.targets)
    previous = model.metadata.get("calibration", {})
    model.metadata["calibration"] = {
        "threshold": thresholds[target][0], "target_fpr": target, "voxels": int(ours.size),
        "baseline_threshold": thresholds[target][1], "baseline_target_fpr": target, "baseline_median_size": 5,
        "baseline_direction": lesion_direction(model.metadata),
        "method": f"healthy voxels (outside the tumour labels) of whole volumes of {len(rows)} patients the model "
                  "never trained on: " + ", ".join(row["case"] for row in rows) + f"; target {target} chosen as the "
                  f"largest of {args.targets} giving at most {args.max_fpr} healthy false positives on the "
                  "selection patients " + ", ".join(row["case"] for row in selection),
        "selection": {"mean": mean, "cases": per_case},
        "previous": {k: previous.get(k) for k in ("threshold", "target_fpr", "baseline_threshold")},
    }
    model.metadata["threshold"] = thresholds[target][0]
    fine = add_fine_map(model, args.fine_blur_mm, device=args.device) if args.fine_blur_mm > 0 else None
    save_model(args.output, model.network.cpu(), model.metadata)
    log(f"{args.output}: target {target}, threshold {thresholds[target][0]:.4f}, baseline {thresholds[target][1]:.4f}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"thresholds": thresholds, "mean": mean, "cases": per_case, "target": target, "fine_map": fine},
                      f, indent=1)


if __name__ == "__main__":
    main()
