"""Train the brain FLAIR candidates and choose among them without development labels.

    # one candidate on the 22 fitting patients ("fit") or on all 28 ("all"), checkpoints at each milestone
    python SynomalyEngine/scripts/brain_flair_candidates.py train mask-small fit runs/v2 --steps 600 2000
    # every fitted candidate measured on the 6 selection patients, with the intensity baseline beside it
    python SynomalyEngine/scripts/brain_flair_candidates.py select runs/v2 [--inference NAME ...]
    python SynomalyEngine/scripts/brain_flair_candidates.py table runs/v2     # the measurements as a table

The split is brain_flair_recipe.split_patients (seeded, by patient). ``select`` calibrates each model on
the held-out healthy slice blocks of the fitting patients (as training does) and measures on whole volumes
of the selection patients, which no candidate trained on: AUPRC, Dice and healthy-voxel false-positive
rate at the calibrated threshold, Dice at the threshold that gives the target rate on the selection
patients' own healthy voxels (what an unseen patient needs), and how far the first transfers to the
second. ``--pack`` reads the cases from pack_brain_cases.py's file instead of ../shared/data.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from brain_flair_recipe import load_cases, split_patients, training_rows, training_settings

CANDIDATES = {
    # name: training settings beside the recipe's
    "skip-small": {"lesion_slices": "skip"},
    "mask-small": {"lesion_slices": "mask"},
    "mask-deep": {"lesion_slices": "mask", "num_res_blocks": 2},
    "mask-wide": {"lesion_slices": "mask", "base_channels": 64},
    # Tumour-free slices only (the masked tumour slices lost clearly), deeper or wider than the default.
    "skip-deep": {"lesion_slices": "skip", "num_res_blocks": 2},
    "skip-wide": {"lesion_slices": "skip", "base_channels": 64},
    "skip-25d": {"lesion_slices": "skip", "context_slices": 1},  # 2.5D: each slice with one neighbour each side
    # Issue 19: the network at 192 px (about 1 mm a pixel for a brain, 1.4 mm at 128) for lesions of 3-5 mm, and
    # bias fields up to 0.6 on half of the slices (FLAIR without N4).
    "skip-hires-bias": {"lesion_slices": "skip", "image_size": 192, "bias_field": 0.6},
}
INFERENCE = {
    "default": {},
    "t100": {"noise_level": 100},
    "t300": {"noise_level": 300},
    "one-stage": {"max_stages": 1},
    "five-stages": {"max_stages": 5},
    "absolute": {"signed": False},
    "ensemble3": {"ensemble": 3},
    "rim2": {"rim_mm": 2.0},
    "rim4": {"rim_mm": 4.0},
    "volume-scale": {"map_scale": "volume"},
    "rim2-volume-scale": {"rim_mm": 2.0, "map_scale": "volume"},
    "one-stage-volume-scale": {"max_stages": 1, "map_scale": "volume"},  # 89d4c8e92da8's
    # The same with a wider blur of the map (sigma in mm; 1.5 above).
    "one-stage-volume-scale-blur2.5": {"max_stages": 1, "map_scale": "volume", "blur_mm": 2.5},
    "one-stage-volume-scale-blur3.5": {"max_stages": 1, "map_scale": "volume", "blur_mm": 3.5},
    "one-stage-volume-scale-blur4.5": {"max_stages": 1, "map_scale": "volume", "blur_mm": 4.5},
    # 124b3e59cffd's, and a9ac34d049d6's before its fine map (calibrate_fine_map.py): components from 20 mm^3
    # keep every 10 mm sphere (small_lesions.py).
    "one-stage-volume-scale-blur3.5-min20": {"max_stages": 1, "map_scale": "volume", "blur_mm": 3.5,
                                             "min_component_mm3": 20.0},
}
TARGETS = (0.002, 0.005, 0.01)


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cmd_train(args):
    from synomaly.training.loop import train

    rows = training_rows()
    fit, _ = split_patients(rows)
    cases = load_cases(fit if args.part == "fit" else rows, args.pack)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"{args.candidate}-{args.part}.safetensors"
    t0 = time.time()
    marks = {}  # step -> time, to tell the training rate from the fixed cost (slices, calibration) per milestone

    def progress(step, total, loss, message):
        if message.startswith("step"):
            marks[step] = time.time()
        if step % 500 == 0 or message in ("calibrating", "done"):
            log(f"{model.name}: {message}")

    previous, before, milestone_s = 0, 0, 0.0  # the last milestone reached, the one before it, its wall time
    for steps in args.steps:
        if previous and args.deadline:
            # The last milestone's pace: the rate of its steps, and the rest (slices, calibration) as fixed.
            first = min(s for s in marks if s > before)
            rate = (marks[previous] - marks[first]) / max(previous - first, 1)
            fixed = milestone_s - rate * (previous - before)
            if time.time() - t0 + rate * (steps - previous) + fixed > args.deadline:
                log(f"{model.name}: stopping at {previous} steps; {steps} would pass the deadline")
                break
        started, before = time.time(), previous
        settings = training_settings(steps, args.device, batch_size=args.batch_size, checkpoint_every=250,
                                     preview_every=10 ** 9, **CANDIDATES[args.candidate])
        train(cases, model, settings, resume=previous > 0, overwrite=previous == 0, progress=progress)
        previous, milestone_s = steps, time.time() - started
        shutil.copyfile(model, out / f"{args.candidate}-{args.part}-{steps}.safetensors")
    return 0


def volume_scores(model, case, device):
    """Maps of ours and the baseline over one whole volume, in the reoriented grid, with its foreground."""
    from synomaly.inference.baseline import baseline_for, lesion_direction
    from synomaly.inference.detection import DetectionSettings, detect

    result = detect(case.image, case.geometry, model, case.mask,
                    DetectionSettings(device=device, maps_only=True, skull_check=False))
    prepared = result.prepared
    orient = prepared.orientation
    base = baseline_for(prepared, 5, lesion_direction(model.metadata))  # in the input's grid, as the map
    return orient.apply(result.anomaly_map), orient.apply(base), orient.apply(case.labels), prepared


def dice_fpr(seg, gt, fg):
    from synomaly.evaluation.metrics import dice

    healthy = fg & ~gt
    return dice(seg & fg, gt), float((seg & healthy).sum() / max(int(healthy.sum()), 1))


def case_means(rows):
    """The mean of every figure over per-case rows (each a dict with its ``case`` name)."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "case"}


def measure(model, fit_cases, split, selection_cases, device):
    """Everything ``select`` reports for one model with its current inference settings."""
    from synomaly.inference.baseline import baseline_segmentation, calibrate_threshold
    from synomaly.evaluation.metrics import auprc, best_threshold_dice
    from synomaly.inference.postprocessing import segment
    from synomaly.training.calibration import healthy_validation_scores

    t0 = time.time()
    h_in, hb_in, _ = healthy_validation_scores(model, fit_cases, split, device)
    cases, h_out, hb_out = [], [], []
    for case in selection_cases:
        ours, base, gt, prepared = volume_scores(model, case, device)
        fg = prepared.foreground
        cases.append((case.name, ours, base, gt, fg, prepared))
        h_out.append(ours[fg & ~gt])
        hb_out.append(base[fg & ~gt])
    h_out, hb_out = np.concatenate(h_out), np.concatenate(hb_out)
    min_mm3 = float(model.metadata["inference"].get("min_component_mm3", 100.0))
    rows = []
    for name, ours, base, gt, fg, prepared in cases:
        voxel = float(np.prod(prepared.spacing_zyx))
        row = {"case": name, "auprc": auprc(ours, gt, fg), "baseline_auprc": auprc(base, gt, fg),
               "oracle_dice": best_threshold_dice(ours, gt, fg).dice,
               "baseline_oracle_dice": best_threshold_dice(base, gt, fg).dice}
        for q in TARGETS:
            for where, h, hb in (("in", h_in, hb_in), ("out", h_out, hb_out)):
                seg = segment(ours, calibrate_threshold(h, q), min_mm3, voxel)[0].astype(bool)
                row[f"dice_{where}@{q}"], row[f"fpr_{where}@{q}"] = dice_fpr(seg, gt, fg)
                bseg = baseline_segmentation(base, calibrate_threshold(hb, q), fg).astype(bool)
                row[f"baseline_dice_{where}@{q}"], row[f"baseline_fpr_{where}@{q}"] = dice_fpr(bseg, gt, fg)
        rows.append(row)
    mean = case_means(rows)
    # The held-out-block target that gives the selection patients' threshold: how calibration transfers.
    transfer = {str(q): float(np.mean(h_in > calibrate_threshold(h_out, q))) for q in TARGETS}
    return {"mean": mean, "cases": rows, "transfer_target": transfer, "seconds": round(time.time() - t0, 1),
            "inference": dict(model.metadata["inference"])}


def cmd_select(args):
    from synomaly.files.model_file import load_model
    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.training.calibration import settings_from_model
    from synomaly.training.slices import extract_slices

    rows = training_rows()
    fit_rows, selection_rows = split_patients(rows)
    fit_cases = load_cases(fit_rows, args.pack)
    selection_cases = load_cases(selection_rows, args.pack)
    out = Path(args.out_dir)
    # Longest-trained first: the most telling figures arrive first when time runs short.
    models = sorted(out.glob(args.models), key=lambda p: -int(p.stem.rsplit("-", 1)[1]))
    results_path = out / args.results
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    splits = {}
    for path in models:
        model = load_model(path)
        settings = settings_from_model(model.metadata)
        key = (settings.seed, settings.validation_fraction, settings.min_slice_foreground)
        if key not in splits:
            splits[key] = extract_slices(fit_cases, settings, PreprocessConfig.from_dict(
                model.metadata["preprocessing"])).validation
        base_inference = dict(model.metadata["inference"])
        for name in args.inference:
            label = f"{path.stem}/{name}"
            if label in results:
                continue
            model.metadata["inference"] = dict(base_inference, **INFERENCE[name])
            results[label] = measure(model, fit_cases, splits[key], selection_cases, args.device)
            results[label]["training"] = {k: model.metadata["training"][k] for k in ("steps", "wall_time_s",
                                                                                      "parameters", "final_loss")}
            m = results[label]["mean"]
            log(f"{label}: AUPRC {m['auprc']:.3f} (baseline {m['baseline_auprc']:.3f}), Dice@0.5% "
                f"in {m['dice_in@0.005']:.3f} out {m['dice_out@0.005']:.3f} (baseline "
                f"{m['baseline_dice_out@0.005']:.3f}), FPR in@0.5% {m['fpr_in@0.005']:.4f}")
            tmp = results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=float))
            os.replace(tmp, results_path)
    return 0


def cmd_table(args):
    """Every measured candidate as a markdown table, the baseline beside it."""
    rows = {}
    for path in sorted(Path(args.out_dir).glob("selection*.json")):
        rows.update(json.loads(path.read_text()))
    print("| candidate / inference | AUPRC (baseline) | Dice, FPR 0.5 % (baseline) | Dice, FPR 1 % (baseline) | "
          "held-out-block threshold at 0.5 %: FPR, Dice | oracle Dice (baseline) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        m = r["mean"]
        print(f"| {label} | {m['auprc']:.3f} ({m['baseline_auprc']:.3f}) | {m['dice_out@0.005']:.3f} "
              f"({m['baseline_dice_out@0.005']:.3f}) | {m['dice_out@0.01']:.3f} ({m['baseline_dice_out@0.01']:.3f}) | "
              f"{100 * m['fpr_in@0.005']:.2f} %, {m['dice_in@0.005']:.3f} | {m['oracle_dice']:.3f} "
              f"({m['baseline_oracle_dice']:.3f}) |")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("candidate", choices=sorted(CANDIDATES))
    t.add_argument("part", choices=("fit", "all"))
    t.add_argument("out_dir")
    t.add_argument("--steps", type=int, nargs="+", default=[600, 2000])
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--deadline", type=float, default=None, help="seconds; skip a milestone that would pass it")
    s = sub.add_parser("select")
    s.add_argument("out_dir")
    s.add_argument("--models", default="*-fit-*.safetensors", help="glob in OUT_DIR, names ending in -STEPS")
    s.add_argument("--inference", nargs="+", default=["default"], choices=sorted(INFERENCE))
    s.add_argument("--results", default="selection.json")
    for p in (t, s):
        p.add_argument("--pack", default=None)
        p.add_argument("--device", default="auto")
    tb = sub.add_parser("table")
    tb.add_argument("out_dir")
    args = parser.parse_args(argv)
    return {"train": cmd_train, "select": cmd_select, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
