"""Does the answer hold on FLAIR from other pipelines? Altered copies of cases, evaluated like the originals
(issue 19, item 4: Dice within 0.05 of the original's at the default settings).

``write`` puts, for each case of a case list, its FLAIR and tumour label altered each way into
OUT/<variant>/<case>/ (flair.nii.gz, seg.nii.gz, and brainmask.nii.gz where the case has one): the same grid
with a bias field (0.3, 0.6), winsorised, in scanner units, z-scored with the background at 0
(``evaluation.altered_inputs``); 5 and 8 mm slices (labels kept where they cover half a new slice); a 0.5 mm
in-plane grid and the 1 mm template grid of 182 x 218 x 182 (labels by nearest neighbour). ``table`` reads
the ``synomaly evaluate`` of each variant folder and prints ours and the baseline beside the originals'.

    python SynomalyEngine/scripts/degraded_copies.py write runs/degraded --use development
    for v in runs/degraded/*/; do synomaly evaluate $v -o runs/degraded-eval/$(basename $v) -q; done
    python SynomalyEngine/scripts/degraded_copies.py table runs/degraded-eval
"""
import argparse
import json
from pathlib import Path

import numpy as np
from brain_flair_recipe import case_rows, load_cases


def variants(case):
    from synomaly.evaluation.altered_inputs import other_pipelines
    from synomaly.inference.preprocessing import foreground_mask

    fg = case.mask if case.mask is not None else foreground_mask(case.image)
    masks = [case.labels] + ([case.mask] if case.mask is not None else [])
    yield "original", case.image, case.geometry, masks
    yield from other_pipelines(case.image, case.geometry, fg, masks)


def write(out: Path, use: str):
    from synomaly.files.volume_io import write_volume

    for case in load_cases(case_rows(use)):
        for name, image, geometry, masks in variants(case):
            folder = out / name.replace(" ", "_").replace("%", "pct") / case.name
            folder.mkdir(parents=True, exist_ok=True)
            write_volume(folder / "flair.nii.gz", image.astype(np.float32), geometry)
            write_volume(folder / "seg.nii.gz", masks[0].astype(np.uint8), geometry)
            if len(masks) > 1:
                write_volume(folder / "brainmask.nii.gz", masks[1].astype(np.uint8), geometry)
        print(case.name, flush=True)


def table(evaluations: Path):
    def dice_of(folder):
        data = json.loads((folder / "evaluation.json").read_text())
        return {c["name"]: (c["ours"]["dice"], (c["baseline"] or {}).get("dice")) for c in data["cases"]}

    original = dice_of(evaluations / "original")
    mean = lambda xs: float(np.mean([x for x in xs if x is not None]))  # noqa: E731
    print(f"{'variant':22s} ours (original {mean([o for o, _ in original.values()]):.3f})   worst case change   "
          f"baseline (original {mean([b for _, b in original.values()]):.3f})")
    for folder in sorted(p for p in evaluations.iterdir() if (p / "evaluation.json").exists()):
        rows = dice_of(folder)
        changes = [rows[n][0] - original[n][0] for n in rows if n in original]
        print(f"{folder.name:22s} {mean([o for o, _ in rows.values()]):.3f}   {min(changes):+.3f}   "
              f"{mean([b for _, b in rows.values()]):.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("out", type=Path)
    w.add_argument("--use", default="development", choices=("development", "training"))
    t = sub.add_parser("table")
    t.add_argument("evaluations", type=Path)
    args = parser.parse_args()
    if args.command == "write":
        write(args.out, args.use)
    else:
        table(args.evaluations)


if __name__ == "__main__":
    main()
