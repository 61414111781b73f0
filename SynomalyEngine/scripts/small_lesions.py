"""The smallest lesion the pipeline finds: bright spheres of 3, 5 and 10 mm put into real healthy tissue.

For each patient, spheres (FLAIR-bright: the brain's 99.5th intensity percentile, soft 1-voxel edge) are
placed at random in healthy brain at least 10 mm from the brain's border and 15 mm from the tumour, 20 mm
apart. A sphere counts as found when the segmentation touches it. False-positive components are counted
on the same volume away from the spheres and the tumour. Settings compared: the model's own, and
smaller minimum components and blur (``--variants``).

    python SynomalyEngine/scripts/small_lesions.py MODEL [--patients selection|development] [--per-size 6]

Choose on the selection patients with a model fitted without them; report on development cases.
"""
import argparse
import json
import time

import numpy as np
from brain_flair_recipe import case_rows, load_cases, split_patients, training_rows

SIZES_MM = (3.0, 5.0, 10.0)
VARIANTS = {
    "model": {},
    "min20": {"min_component_mm3": 20.0},
    "min5": {"min_component_mm3": 5.0},
    "min20-blur0.75": {"min_component_mm3": 20.0, "blur_mm": 0.75},
    "min20-blur1.5": {"min_component_mm3": 20.0, "blur_mm": 1.5},
}


def implant(case, rng, per_size):
    """A copy of the image with spheres, and the list of (diameter, mask) placed."""
    from scipy import ndimage

    spacing = np.asarray(case.geometry.spacing[::-1], dtype=float)  # z, y, x
    brain = case.mask if case.mask is not None else case.image > case.image.min()
    inner = ndimage.distance_transform_edt(brain, sampling=spacing) > 10.0
    far = ndimage.distance_transform_edt(~case.labels, sampling=spacing) > 15.0
    allowed = inner & far
    level = float(np.percentile(case.image[brain], 99.5))
    image = case.image.astype(np.float32).copy()
    zz, yy, xx = np.indices(image.shape, sparse=True)
    placed, centres = [], []
    candidates = np.argwhere(allowed)
    for diameter in SIZES_MM:
        for _ in range(per_size):
            for _attempt in range(200):
                c = candidates[rng.integers(len(candidates))]
                if all(np.linalg.norm((c - o) * spacing) > 20.0 for o in centres):
                    break
            else:
                continue
            centres.append(c)
            distance = np.sqrt(((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2
                               + ((xx - c[2]) * spacing[2]) ** 2)
            weight = np.clip(diameter / 2 + 0.5 - distance, 0, 1).astype(np.float32)  # soft 1-voxel edge
            image = image * (1 - weight) + level * weight
            placed.append((diameter, weight > 0.5))
    return image, placed


def score_segmentation(seg, placed, labels):
    """(diameters of the spheres found, the number of false components: those touching neither a sphere nor
    the tumour ``labels``)."""
    from scipy import ndimage

    spheres = np.zeros(seg.shape, dtype=bool)
    hits = []
    for diameter, sphere in placed:
        if (seg & sphere).any():
            hits.append(diameter)
        spheres |= sphere
    components, n = ndimage.label(seg, structure=np.ones((3, 3, 3), dtype=bool))
    touched = set(np.unique(components[spheres | labels]).tolist())
    return hits, len(set(range(1, n + 1)) - touched)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--patients", choices=("selection", "development"), default="selection")
    parser.add_argument("--per-size", type=int, default=6)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pack", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.files.model_file import load_model
    from synomaly.inference.postprocessing import segment

    model = load_model(args.model)
    if args.patients == "selection":
        cases = load_cases(split_patients(training_rows())[1], args.pack)
    else:
        cases = load_cases(case_rows("development"))
    rng = np.random.default_rng(0)
    found = {v: {d: [0, 0] for d in SIZES_MM} for v in args.variants}
    false_components = {v: 0 for v in args.variants}
    t0 = time.time()
    for case in cases:
        image, placed = implant(case, rng, args.per_size)
        result = detect(image, case.geometry, model, case.mask,
                        DetectionSettings(device=args.device, maps_only=True, skull_check=False))
        voxel = float(np.prod(case.geometry.spacing))
        for name in args.variants:
            params = dict(result.report["settings"], **VARIANTS[name])
            if params["blur_mm"] != result.report["settings"]["blur_mm"]:  # the map itself changes: detect again
                anomaly_map = detect(image, case.geometry, model, case.mask, DetectionSettings(
                    device=args.device, maps_only=True, skull_check=False, blur_mm=params["blur_mm"])).anomaly_map
            else:
                anomaly_map = result.anomaly_map
            seg = segment(anomaly_map, model.threshold, float(params["min_component_mm3"]), voxel)[0].astype(bool)
            hits, false = score_segmentation(seg, placed, case.labels)
            for diameter, _ in placed:
                found[name][diameter][1] += 1
            for diameter in hits:
                found[name][diameter][0] += 1
            false_components[name] += false
        print(f"{case.name}: {len(placed)} spheres ({time.time() - t0:.0f} s)", flush=True)
    report = {name: {"found": {f"{d:g} mm": f"{h}/{n}" for d, (h, n) in found[name].items()},
                     "rate": {f"{d:g} mm": h / n if n else None for d, (h, n) in found[name].items()},
                     "false_components_per_case": false_components[name] / len(cases)} for name in args.variants}
    for name, r in report.items():
        print(f"{name:16s} " + "  ".join(f"{k}: {v}" for k, v in r["found"].items())
              + f"  false components per case: {r['false_components_per_case']:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model.model_id, "patients": args.patients, "variants": VARIANTS,
                       "report": report}, f, indent=1)


if __name__ == "__main__":
    main()
