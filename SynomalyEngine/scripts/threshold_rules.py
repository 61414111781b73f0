"""Per-volume threshold rules for the brain model, measured on training patients it never trained on (issue 19,
item 2): does a rule that adapts to each volume, without labels, come nearer each case's best threshold?

The maps of the 20 training patients outside the model's own training (14 calibration + 6 selection patients)
are computed once and cached (``--cache``). Each rule then segments every map, with the model's component size:
- ``fixed``: the calibrated threshold T;
- ``hysteresis f``: components above f * T that reach above T (confident cores grown to their edge);
- ``otsu floor [a, b]``: Otsu's threshold of the log map over the foreground's voxels above ``floor``, clipped
  to a*T-b*T.
Reported per rule: mean Dice, mean healthy false-positive rate, the mean gap to each case's best-threshold
Dice, and the false-positive rate on a healthy-brain proxy: each patient's map with its tumour and 5 voxels
around it taken out of the foreground, the rule applied to what is left (a rule that lowers its threshold
where it finds no lesion shows it there). Development cases are never read.

    python SynomalyEngine/scripts/threshold_rules.py --cache runs/rules
"""
import argparse
import time
from pathlib import Path

import numpy as np
from brain_flair_candidates import dice_fpr, volume_scores
from brain_flair_recipe import load_cases, training_rows


def cached_maps(model, rows, cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    for row in rows:
        path = cache / f"{row['case']}.npz"
        if not path.exists():
            t0 = time.time()
            case = load_cases([row])[0]
            ours, _, gt, prepared = volume_scores(model, case, "auto")
            np.savez_compressed(path, map=ours.astype(np.float32), gt=gt, fg=prepared.foreground,
                                spacing=np.array(prepared.spacing_zyx))
            print(f"{row['case']}: map in {time.time() - t0:.0f} s", flush=True)
        with np.load(path) as data:
            yield row["case"], data["map"], data["gt"].astype(bool), data["fg"].astype(bool), data["spacing"]


def rules(threshold: float):
    from skimage.filters import apply_hysteresis_threshold, threshold_otsu

    def fixed(m, fg):
        return m > threshold

    def hysteresis(f):
        return lambda m, fg: apply_hysteresis_threshold(m * fg, f * threshold, threshold)

    def otsu(floor, a, b):
        def rule(m, fg):
            values = m[fg & (m > floor)]
            t = float(np.exp(threshold_otsu(np.log(values)))) if values.size > 100 else threshold
            return m > float(np.clip(t, a * threshold, b * threshold))
        return rule

    out = {"fixed": fixed}
    out.update({f"hysteresis {f}": hysteresis(f) for f in (0.4, 0.6, 0.8)})
    out.update({f"otsu {floor} [{a}, {b}]": otsu(floor, a, b) for floor in (1.5, 2.0)
                for a, b in ((0.6, 1.4), (0.8, 1.4), (1.0, 1.4))})
    return out


def best_dice(m, gt, fg):
    from synomaly.evaluation.metrics import best_threshold_dice

    return best_threshold_dice(m, gt, fg).dice


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="brain-flair")
    parser.add_argument("--cache", type=Path, default=Path("runs/rules"))
    args = parser.parse_args()
    from scipy import ndimage

    from synomaly.files.model_file import load_model
    from synomaly.inference.postprocessing import segment

    model = load_model(args.model)
    trained_on = {c["case"] for c in model.metadata["training"]["data"]["cases"]}
    rows = [row for row in training_rows() if row["case"] not in trained_on]
    threshold = model.threshold
    min_mm3 = float(model.metadata["inference"]["min_component_mm3"])
    results = {name: [] for name in rules(threshold)}
    gaps = []
    def segmentation(rule, m, fg, voxel):
        return segment((rule(m, fg) & fg).astype(np.float32), 0.5, min_mm3, voxel)[0].astype(bool)

    for name, m, gt, fg, spacing in cached_maps(model, rows, args.cache):
        voxel = float(np.prod(spacing))
        best = best_dice(m, gt, fg)
        healthy = fg & ~ndimage.binary_dilation(gt, iterations=5)
        for rule_name, rule in rules(threshold).items():
            d, fpr = dice_fpr(segmentation(rule, m, fg, voxel), gt, fg)
            proxy = float(segmentation(rule, m * healthy, healthy, voxel)[healthy].mean())
            results[rule_name].append((d, fpr, best - d, proxy))
        gaps.append(best)
    print(f"{len(gaps)} patients; mean best-threshold Dice {np.mean(gaps):.3f}")
    for rule_name, values in results.items():
        d, fpr, gap, proxy = (np.array(v) for v in zip(*values))
        print(f"{rule_name:20s} Dice {d.mean():.3f} (worst {d.min():.3f})  healthy FPR {100 * fpr.mean():.2f} % "
              f"(worst {100 * fpr.max():.2f} %)  gap to best {gap.mean():.3f}  healthy-brain proxy FPR "
              f"{100 * proxy.mean():.2f} % (worst {100 * proxy.max():.2f} %)", flush=True)


if __name__ == "__main__":
    main()
