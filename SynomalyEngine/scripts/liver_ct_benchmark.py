"""Liver CT models on altered copies of our CTs: other slice thickness, another contrast phase, inserted lesions.

    python SynomalyEngine/scripts/liver_ct_benchmark.py runs/liver-ct.safetensors [MORE MODELS] --out runs/bench.json

Test volumes (``synomaly.evaluation.liver_phantoms``), each at its own slice thickness and resliced at 5 mm:
- lits117 (another patient) and ircad17 (same patient as training) as they are: Dice on their real tumours;
- the same with the liver's HU shifted by -30 and +30 (another contrast phase; tumours move with it);
- the same with three inserted spheres of 30, 20 and 10 mm, all darker (-20 to -40 HU) or all brighter
  (+20 to +40 HU) than their liver, kept away from the real tumours;
- totalseg-example (unenhanced, 3 mm, no tumour) as it is and with inserted lesions of either kind.
Per volume: the healthy-liver false-positive rate (liver voxels outside real and inserted lesions that are
flagged; and, apart, of the healthy liver farther than 5 mm from any lesion, since lits117's "healthy" liver
lies mostly within 8 mm of one of its many tumours, where a map's rim around a tumour counts), Dice on real tumours, and per inserted lesion whether it was found (at least 10 % of its voxels
flagged; fixed before any run), plus the false components (flagged components touching no lesion).
Beside each model: the two-sided HU baseline (the 5 x 5 x 5 median-filtered HU's distance from the liver's
own median), its threshold at the model's false-positive target on the held-out healthy training slices of
the v2 recipe, with the same removal of components under the model's minimum size. Nothing here chooses a
setting: thresholds come from healthy training slices only.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
from evaluate_liver_model import validation_region
from liver_ct_recipe import case_files, training_settings, write_training_csv

from synomaly.evaluation.liver_phantoms import BORDER_MM, insert_lesions, room_mm, shift_phase, thicker_slices
from synomaly.evaluation.metrics import dice
from synomaly.files.model_file import load_model
from synomaly.files.volume_io import read_volume
from synomaly.inference.baseline import baseline_for, calibrate_threshold
from synomaly.inference.detection import DetectionSettings, detect
from synomaly.inference.postprocessing import segment
from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume
from synomaly.training.cases import find_cases
from synomaly.training.slices import extract_slices

DIAMETERS_MM = (30.0, 20.0, 10.0)
CONTRASTS = {"darker": (-40.0, -20.0), "brighter": (20.0, 40.0)}
PHASES = (-30.0, 30.0)
FOUND_SHARE = 0.10
FAR_MM = 5.0  # "away from lesions": healthy liver farther than this from any real or inserted lesion


def test_volumes(name, seed):
    """(label, image, geometry, liver, tumour, lesions) for one case and its altered copies, own and 5 mm."""
    files = case_files(name)
    image, geometry = read_volume(files["image"])
    liver = read_volume(files["mask"])[0] > 0
    tumour = read_volume(files["label"])[0] > 0 if files["label"] else np.zeros_like(liver)
    none = np.zeros(liver.shape, dtype=np.int16)
    variants = [("", image.astype(np.float32), none)]
    variants += [(f" liver {s:+g} HU", shift_phase(image, liver, s), none) for s in PHASES]
    # lits117's healthy liver has no room for a 30 mm sphere (3 mm from its border and its tumours).
    room = float(room_mm(liver & ~tumour, geometry).max())
    sizes = [d for d in DIAMETERS_MM if room >= d / 2 + BORDER_MM]
    for i, (kind, contrast) in enumerate(CONTRASTS.items()):
        inserted = insert_lesions(image, liver, geometry, sizes, contrast, seed + i, avoid=tumour)
        variants.append((f" + {kind} lesions", inserted.image, inserted.lesions))
    for label, volume, lesions in variants:
        yield f"{name}{label}", volume, geometry, liver, tumour, lesions
    if geometry.spacing[2] < 5.0:
        for label, volume, lesions in variants:
            each = [lesions == k for k in range(1, int(lesions.max()) + 1)]
            thick, g5, (l5, t5, *ids) = thicker_slices(volume, geometry, 5.0, [liver, tumour] + each)
            l5_lesions = np.zeros(l5.shape, dtype=np.int16)
            for k, m in enumerate(ids, start=1):
                l5_lesions[m] = k
            yield f"{name} 5 mm{label}", thick, g5, l5, t5, l5_lesions


def baseline_threshold(target_fpr, config):
    """The two-sided baseline's threshold on the v2 recipe's held-out healthy slices."""
    cases = find_cases([write_training_csv()])
    validation = extract_slices(cases, training_settings(1), config).validation
    scores = []
    for index, slices in validation.items():
        if slices:
            case = cases[index]
            prepared = prepare_volume(case.image, case.geometry, config, case.mask)
            scores.append(baseline_for(prepared, 5, 0)[validation_region(prepared, slices)])
    return float(calibrate_threshold(np.concatenate(scores), target_fpr))


def measure(segmentation, liver, tumour, lesions, spacing_zyx):
    from scipy import ndimage

    anomalous = tumour | (lesions > 0)
    healthy = liver & ~anomalous
    distance = ndimage.distance_transform_edt(~anomalous, sampling=spacing_zyx) if anomalous.any() else None
    far = healthy if distance is None else healthy & (distance > FAR_MM)
    row = {"fpr": float((segmentation & healthy).sum() / max(1, healthy.sum())),
           "fpr_far": float((segmentation & far).sum() / max(1, far.sum()))}
    if tumour.any():
        row["dice_tumour"] = dice(segmentation & liver & ~(lesions > 0), tumour)
    n = int(lesions.max())
    row["lesions"] = [float((segmentation & (lesions == k)).sum() / max(1, (lesions == k).sum()))
                      for k in range(1, n + 1)]
    row["diameters_mm"] = list(DIAMETERS_MM[len(DIAMETERS_MM) - n:])  # lesion k: the k-th largest that fitted
    near = distance <= 2.0 if distance is not None else anomalous
    labels, n = ndimage.label(segmentation, structure=np.ones((3, 3, 3), dtype=bool))
    touching = set(np.unique(labels[near & (labels > 0)]).tolist())
    row["false_components"] = int(n - len(touching))
    return row


def run_model(path, volumes, base_threshold, inference, min_sizes):
    """Each volume's measures for the model at its own minimum component size and at each of ``min_sizes``
    (the same map: only the removal of small components differs), and for the baseline."""
    model = load_model(path)
    model.metadata["inference"].update(inference)
    own = float(model.metadata["inference"]["min_component_mm3"])
    rows = []
    for label, image, geometry, liver, tumour, lesions in volumes:
        t0 = time.time()
        result = detect(image, geometry, model, liver, DetectionSettings(device="cpu"))
        spacing = tuple(reversed(geometry.spacing))
        row = {"volume": label, "seconds": round(time.time() - t0, 1)}
        for size in sorted({own, *min_sizes}):
            seg = segment(result.anomaly_map, model.threshold, size, geometry.voxel_volume_mm3)[0] > 0
            row[f"ours {size:g} mm3"] = measure(seg, liver, tumour, lesions, spacing)
        base = baseline_for(result.prepared, 5, 0)
        base_seg = segment(np.where(liver, base, 0), base_threshold, own, geometry.voxel_volume_mm3)[0] > 0
        row["baseline"] = measure(base_seg, liver, tumour, lesions, spacing)
        rows.append(row)
        print(label, json.dumps(row), flush=True)
    return {"model": str(path), "model_id": model.model_id, "threshold": model.threshold,
            "inference": inference, "rows": rows}


def summary(result):
    lines = []
    for who in [k for k in result["rows"][0] if k.startswith("ours")] + ["baseline"]:
        rows = [r[who] for r in result["rows"]]
        names = [r["volume"] for r in result["rows"]]
        fprs = [r["fpr"] for r in rows]
        fars = [r["fpr_far"] for r in rows]
        found = {}
        for name, r in zip(names, rows):
            kind = "darker" if "darker" in name else "brighter" if "brighter" in name else None
            for d, share in zip(r["diameters_mm"], r["lesions"]):
                found.setdefault((kind, d), []).append(share >= FOUND_SHARE)
        dices = {n: r["dice_tumour"] for n, r in zip(names, rows) if "dice_tumour" in r and "lesions" not in n}
        lines.append(f"{who}: FPR max {100 * max(fprs):.2f} % (mean {100 * np.mean(fprs):.2f} %), volumes over 2 %: "
                     f"{sum(f > 0.02 for f in fprs)}/{len(fprs)}; beyond {FAR_MM:g} mm of lesions max {100 * max(fars):.2f} %, over "
                     f"2 %: {sum(f > 0.02 for f in fars)}; false components max "
                     f"{max(r['false_components'] for r in rows)}, mean {np.mean([r['false_components'] for r in rows]):.1f}")
        lines.append("  found: " + ", ".join(f"{k} {d:g} mm {sum(v)}/{len(v)}" for (k, d), v in sorted(found.items())))
        lines.append("  Dice on real tumours: " + ", ".join(f"{n} {v:.3f}" for n, v in dices.items()))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--inference", default="{}", help="JSON: inference settings to override in every model")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--min-components", default="", help="more minimum component sizes (mm^3) to measure, "
                        "comma-separated, e.g. 250,500")
    args = parser.parse_args()
    first = load_model(args.models[0])
    config = PreprocessConfig.from_dict(first.metadata["preprocessing"])
    base_threshold = baseline_threshold(first.metadata["calibration"]["target_fpr"], config)
    volumes = [v for name in ("lits117", "ircad17", "totalseg-example") for v in test_volumes(name, args.seed)]
    results = {"baseline_threshold": base_threshold, "models": []}
    for path in args.models:
        sizes = [float(v) for v in args.min_components.split(",") if v]
        results["models"].append(run_model(path, volumes, base_threshold, json.loads(args.inference), sizes))
        print(summary(results["models"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
