"""How much detection work can be left out without changing the answer, measured on the six selection
patients (never the development cases): each variant against the shipped settings, with the network
slice-evaluations it needs, its network time, AUPRC and Dice and healthy false-positive rate at the
model's own threshold.

    OMP_NUM_THREADS=2 python SynomalyEngine/scripts/do_less_work.py [--model brain-flair] [--out F.json]

Variants: fewer stages at most (``max_stages``), a looser convergence test (a slice stops once its
anomalous-pixel count changes by less than ``tolerance``; default 0.01), and skipping slices with little
brain (``min_foreground_fraction`` of the in-plane crop; default 0.02).
"""
import argparse
import dataclasses
import json
import os
import time

from brain_flair_candidates import case_means, dice_fpr
from brain_flair_recipe import load_cases, split_patients, training_rows

VARIANTS = {
    "default": {},
    "max-stages-2": {"max_stages": 2},
    "one-stage": {"max_stages": 1},
    "tolerance-0.05": {"tolerance": 0.05},
    "tolerance-0.2": {"tolerance": 0.2},
    "foreground-0.05": {"min_foreground_fraction": 0.05},
    "foreground-0.10": {"min_foreground_fraction": 0.10},
}


def run_variant(model, cases, change, device):
    """Per-case figures for one variant (the model's metadata and the stage test changed for its duration)."""
    import synomaly.inference.multistage as multistage
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.evaluation.metrics import auprc

    inference, preprocessing = dict(model.metadata["inference"]), dict(model.metadata["preprocessing"])
    original_run_stages = multistage.run_stages
    if "max_stages" in change:
        model.metadata["inference"] = dict(inference, max_stages=change["max_stages"])
    if "min_foreground_fraction" in change:
        model.metadata["preprocessing"] = dict(preprocessing, min_foreground_fraction=change["min_foreground_fraction"])
    if "tolerance" in change:
        def run_stages(network, schedule, x0, foreground, settings, *args, **kwargs):
            settings = dataclasses.replace(settings, tolerance=change["tolerance"])
            return original_run_stages(network, schedule, x0, foreground, settings, *args, **kwargs)
        multistage.run_stages = run_stages
    rows = []
    try:
        for case in cases:
            result = detect(case.image, case.geometry, model, case.mask,
                            DetectionSettings(device=device, skull_check=False))
            fg = result.prepared.orientation.invert(result.prepared.foreground)
            dice, fpr = dice_fpr(result.segmentation > 0, case.labels, fg)
            r = result.report
            evaluations = r["slices_processed"] * r["mean_stages"]
            rows.append({"case": case.name, "auprc": auprc(result.anomaly_map, case.labels, fg), "dice": dice,
                         "fpr": fpr, "slices": r["slices_processed"], "evaluations": evaluations,
                         "network_s": r["timings_s"]["network_s"]})
    finally:
        model.metadata["inference"], model.metadata["preprocessing"] = inference, preprocessing
        multistage.run_stages = original_run_stages
    return rows


def main(argv=None):
    from synomaly.files.model_file import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="brain-flair")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pack", default=None, help="pack_brain_cases.py's file instead of ../shared/data")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=None, help="write the per-case figures as JSON")
    args = p.parse_args(argv)
    model = load_model(args.model)
    cases = load_cases(split_patients(training_rows())[1], args.pack)
    print(f"{model.name} ({model.model_id}), {len(cases)} selection patients, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{'variant':<16} {'evaluations':>11} {'network s':>9} {'AUPRC':>6} {'Dice':>6} {'FPR %':>6}  vs default")
    results = {}
    for name in args.variants:
        t0 = time.time()
        rows = run_variant(model, cases, VARIANTS[name], args.device)
        mean = case_means(rows)
        results[name] = {"mean": mean, "cases": rows, "seconds": round(time.time() - t0, 1)}
        base = results.get("default", {}).get("mean")
        delta = (f"AUPRC {mean['auprc'] - base['auprc']:+.4f}, Dice {mean['dice'] - base['dice']:+.4f}, "
                 f"work x{mean['evaluations'] / base['evaluations']:.2f}" if base and name != "default" else "")
        print(f"{name:<16} {mean['evaluations']:>11.0f} {mean['network_s']:>9.1f} {mean['auprc']:>6.3f} "
              f"{mean['dice']:>6.3f} {100 * mean['fpr']:>6.2f}  {delta}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
