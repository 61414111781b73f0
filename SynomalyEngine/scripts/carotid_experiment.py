"""The carotid ultrasound experiment: split by acquisition, train, measure on held-out acquisitions.

    python SynomalyEngine/scripts/carotid_experiment.py split ../shared/data/carotid-us runs/carotid
    synomaly train runs/carotid/train.csv --preset carotid-us -o runs/carotid/carotid-us.safetensors \\
        --name carotid-us --steps 385 --image-size 64 --base-channels 32 --res-blocks 1 --batch-size 8
    python SynomalyEngine/scripts/carotid_experiment.py evaluate runs/carotid/carotid-us.safetensors runs/carotid

``split`` writes ``train.csv`` (image, lumen mask, acquisition as group: training holds out whole
acquisitions for calibration) and ``test.csv`` (the held-out acquisitions: every third acquisition in
the order of their ids, starting at the third; never trained or calibrated on). The training command
above made the bundled ``carotid-us`` model (see its card).

``evaluate`` runs ``synomaly evaluate`` on cases made from the test images: each image as it is (no
plaque: every detection is a false positive), and with plaques inserted by ``synomaly.evaluation.plaque`` (the
function the tests use), each given the lumen left beside its plaque as its mask. It reports the
false-positive rate on the plain images and Dice and AUPRC on the plaque images, ours next to the
intensity baseline (median-filtered grey level, its threshold calibrated on the same held-out
training acquisitions as the model's); nothing is tuned on the test images.
"""
import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

PLAQUES_PER_IMAGE = 2


def acquisition(path: Path) -> str:
    return path.stem.split("_slice_")[0]


def split(data: Path, work: Path) -> None:
    images = sorted((data / "images").glob("*.png"))
    acquisitions = sorted({acquisition(p) for p in images})
    test = set(acquisitions[2::3])
    work.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, keep in (("train", lambda a: a not in test), ("test", lambda a: a in test)):
        rows = [(p, data / "lumen_masks" / p.name, acquisition(p)) for p in images if keep(acquisition(p))]
        with open(work / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "mask", "group"])
            w.writerows([(str(i.resolve()), str(m.resolve()), g) for i, m, g in rows])
        counts[name] = (len(rows), len({g for _, _, g in rows}))
    for name, (n_images, n_acq) in counts.items():
        print(f"{name}.csv: {n_images} images of {n_acq} acquisitions")


def make_cases(work: Path) -> Path:
    """Plain and plaque cases of the test images, as PNG files and a CSV for ``synomaly evaluate``."""
    from synomaly.evaluation.plaque import PlaqueSettings, insert_plaque
    from synomaly.files.volume_io import read_volume, write_volume

    folder = work / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    rows, plaques = [], []
    with open(work / "test.csv", newline="", encoding="utf-8") as f:
        test = list(csv.DictReader(f))
    for index, row in enumerate(test):
        image, geometry = read_volume(row["image"])
        lumen, _ = read_volume(row["mask"])
        stem = Path(row["image"]).stem
        variants = [("plain", image, np.zeros(image.shape, np.uint8), lumen > 0, None)]
        for k in range(PLAQUES_PER_IMAGE):
            plaque = insert_plaque(image, lumen, seed=1000 * index + k)
            variants.append((f"plaque{k}", plaque.image, plaque.mask, plaque.lumen, plaque.params))
        for kind, img, label, mask, params in variants:
            name = f"{stem}_{kind}"
            paths = {key: folder / f"{name}_{key}.png" for key in ("image", "label", "mask")}
            write_volume(paths["image"], img, geometry)
            write_volume(paths["label"], (label > 0).astype(np.uint8) * 255, geometry)
            write_volume(paths["mask"], mask.astype(np.uint8) * 255, geometry)
            rows.append({"image": paths["image"].name, "label": paths["label"].name, "mask": paths["mask"].name,
                         "name": name})
            if params is not None:
                plaques.append(dict(params, case=name))
    cases = folder / "cases.csv"
    with open(cases, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "mask", "name"])
        w.writeheader()
        w.writerows(rows)
    (folder / "plaques.json").write_text(json.dumps({"settings": PlaqueSettings().to_dict(), "plaques": plaques},
                                                    indent=2) + "\n")
    return cases


def _mean(values):
    finite = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(evaluation: dict) -> dict:
    plain = [c for c in evaluation["cases"] if c["name"].endswith("_plain")]
    plaque = [c for c in evaluation["cases"] if not c["name"].endswith("_plain")]
    out = {"plain_images": len(plain), "plaque_images": len(plaque)}
    for method in ("ours", "baseline"):
        fp = sum(c[method]["counts"]["fp_foreground"] for c in plain if c[method]["counts"])
        region = sum(c[method]["counts"]["healthy_foreground"] for c in plain if c[method]["counts"])
        out[method] = {
            "fpr_plain": fp / region if region else float("nan"),
            "plain_images_with_detections": sum(1 for c in plain if c[method]["counts"]
                                                and c[method]["counts"]["fp"] > 0),
            "dice_plaque": _mean(c[method]["dice"] for c in plaque),
            "auprc_plaque": _mean(c[method]["auprc"] for c in plaque),
            "auroc_plaque": _mean(c[method]["auroc"] for c in plaque),
            "recall_plaque": _mean(c[method]["recall"] for c in plaque),
            "precision_plaque": _mean(c[method]["precision"] for c in plaque),
            "oracle_dice_plaque": _mean(c[method]["oracle_best_threshold_dice"] for c in plaque),
        }
    return out


def table(summary: dict) -> str:
    lines = ["| method | FPR plain images | plain images with detections | Dice plaques | AUPRC plaques | "
             "AUROC plaques | recall | precision | best-threshold Dice (oracle) |", "|" + "---|" * 9]
    for method, label in (("ours", "Synomaly (ours)"), ("baseline", "intensity baseline")):
        m = summary[method]
        lines.append(f"| {label} | {100 * m['fpr_plain']:.2f} % | {m['plain_images_with_detections']} of "
                     f"{summary['plain_images']} | {m['dice_plaque']:.3f} | {m['auprc_plaque']:.3f} | "
                     f"{m['auroc_plaque']:.3f} | {m['recall_plaque']:.3f} | {m['precision_plaque']:.3f} | "
                     f"{m['oracle_dice_plaque']:.3f} |")
    return "\n".join(lines)


def evaluate_model(model_path: Path, work: Path, device: str) -> None:
    from synomaly.inference.detection import DetectionSettings
    from synomaly.evaluation.cases import find_eval_cases
    from synomaly.evaluation.evaluate import evaluate
    from synomaly.files.model_file import load_model

    cases = make_cases(work)
    model = load_model(model_path)
    evaluation = evaluate(find_eval_cases([cases]), model, DetectionSettings(device=device), work / "evaluation",
                          target_fpr=model.metadata["calibration"]["target_fpr"])
    summary = summarise(evaluation)
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = table(summary)
    (work / "summary.md").write_text(text + "\n")
    print(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split")
    p.add_argument("data", type=Path, help="the carotid-us data folder (images/, lumen_masks/)")
    p.add_argument("work", type=Path)
    p = sub.add_parser("evaluate")
    p.add_argument("model", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.command == "split":
        split(args.data, args.work)
    else:
        evaluate_model(args.model, args.work, args.device)


if __name__ == "__main__":
    main()
