"""Input fit of the brain FLAIR model: which inputs it answers, warns about or refuses, and what it answers.

The model's input reference (``calibration.input_reference``) is made from the whole volumes of the
calibration patients (the recipe's fitting patients it did not train on; ``--write`` stores it in a copy of
the model). It is then tried on the 6 selection patients as they are, on altered copies that a user's
pipeline could make (``evaluation.altered_inputs.ACCEPTABLE``, 5 and 8 mm slices, a 0.5 mm in-plane grid, a
1 mm template grid of 182 x 218 x 182) and on inputs of another kind (``FOREIGN`` contrasts; the liver CTs
with their liver masks). ``--development`` adds the 10 development cases, as they are (their images only:
no label is read). Each row: the fit score, its verdict, the worst feature, and the anomalous volume.
``--others`` adds the bundled liver-ct model (the three CTs as they are, at +-30 HU, at 5 mm; a brain FLAIR
with its brain as the mask) and carotid-us model (the 35 test images; the same images inverted).
``--inverted-all`` adds every brain case (28 training, 10 development) as it is and inverted, scored by its
profile alone (no network: the fluid order decides), under the reference just made.

    python SynomalyEngine/scripts/input_fit_benchmark.py SynomalyEngine/synomaly/models/brain-flair.safetensors \\
        --write runs/brain-flair-fit.safetensors --json runs/input-fit.json
"""
import argparse
import json
import platform
import time
from pathlib import Path

from brain_flair_recipe import DATA, case_rows, load_cases, split_patients, training_rows


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run(model, image, geometry, mask):
    from synomaly.errors import InputError
    from synomaly.inference.detection import DetectionSettings, detect

    t0 = time.time()
    try:
        result = detect(image, geometry, model, mask, DetectionSettings(fit_check=False, skull_check=False))
    except InputError as exc:
        return {"refused_by": str(exc)[:160], "seconds": time.time() - t0}
    fit = result.report["input_fit"]
    return {"score": fit["score"], "verdict": fit["verdict"], "worst": fit.get("worst"),
            "distances": fit.get("distances"), "profile": fit["profile"],
            "ml": result.report["anomalous_volume_ml"], "seconds": time.time() - t0}


def say(group: str, label: str, row) -> None:
    """One printed row: its score, verdict, worst feature and answer, or why it was refused."""
    print(f"{group:11s} {label:49s} " + (
        f"score {row['score']:6.2f} {row['verdict']:8s} worst {row['worst'] or '-':9s} {row['ml']:7.1f} mL"
        if "score" in row else f"refused: {row['refused_by']}"), flush=True)


def variants(case):
    """(name, image, geometry, mask) of the case as it is, altered and foreign."""
    from synomaly.evaluation.altered_inputs import FOREIGN, other_pipelines
    from synomaly.inference.preprocessing import foreground_mask

    fg = case.mask if case.mask is not None else foreground_mask(case.image)
    yield "as it is", case.image, case.geometry, case.mask
    masks = [case.mask] if case.mask is not None else []
    for name, image, geometry, moved in other_pipelines(case.image, case.geometry, fg, masks):
        yield name, image, geometry, (moved[0] if moved else None)
    for name, alter in FOREIGN.items():
        yield "FOREIGN " + name, alter(case.image, fg), case.geometry, case.mask


def liver_inputs():
    from synomaly.files.volume_io import read_volume

    for folder in sorted((DATA / "liver-ct").iterdir()):
        if (folder / "ct.nii.gz").exists():
            image, geometry = read_volume(folder / "ct.nii.gz")
            mask = read_volume(folder / "liver.nii.gz")[0] > 0
            yield f"FOREIGN liver CT {folder.name}", image, geometry, mask


def other_model_inputs():
    """(model name, row name, image, geometry, mask) for the liver and carotid models."""
    import csv

    from synomaly.evaluation.liver_phantoms import shift_phase, thicker_slices
    from synomaly.files.volume_io import read_volume
    from synomaly.inference.preprocessing import foreground_mask

    for name, image, geometry, mask in liver_inputs():
        ct = name.replace("FOREIGN liver CT ", "")
        yield "liver-ct", f"{ct} as it is", image, geometry, mask
        for shift in (-30, 30):
            yield "liver-ct", f"{ct} {shift:+d} HU", shift_phase(image, mask, shift), geometry, mask
        if geometry.spacing[2] < 4.0:
            thick, thick_geometry, masks = thicker_slices(image, geometry, 5.0, [mask])
            yield "liver-ct", f"{ct} 5 mm slices", thick, thick_geometry, masks[0]
    flair, geometry = read_volume(DATA / "brats2018" / "Brats18_2013_23_1" / "flair.nii.gz")
    yield "liver-ct", "FOREIGN brain FLAIR, brain as mask", flair, geometry, foreground_mask(flair)
    split = Path("runs/carotid/test.csv")
    if not split.exists():
        print("carotid-us rows need runs/carotid/test.csv (carotid_experiment.py split)", flush=True)
        return
    with open(split, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        image, geometry = read_volume(row["image"])
        mask = read_volume(row["mask"])[0] > 0
        yield "carotid-us", Path(row["image"]).stem, image, geometry, mask
        yield "carotid-us", "FOREIGN inverted " + Path(row["image"]).stem, 255 - image, geometry, mask


def inverted_everywhere(model, reference):
    """Every brain case as it is and inverted (``FOREIGN``), by profile alone: how many an inverted contrast
    gets refused, warned or through, and the FLAIRs' fluid order beside."""
    from synomaly.evaluation.altered_inputs import invert
    from synomaly.inference.input_fit import fit_score, intensity_profile
    from synomaly.inference.preprocessing import PreprocessConfig, foreground_mask, prepare_in_box

    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    rows = []
    for case in load_cases(training_rows() + case_rows("development")):
        fg = case.mask if case.mask is not None else foreground_mask(case.image)
        for name, image in (("as it is", case.image), ("FOREIGN inverted", invert(case.image, fg))):
            prepared = prepare_in_box(image, case.geometry, config, case.mask).inner  # as detection prepares it
            fit = fit_score(intensity_profile(prepared, brain=True), reference)
            rows.append({"group": "profile", "case": case.name, "input": name, **fit})
            print(f"profile     {case.name:22s} {name:26s} score {fit['score']:6.2f} {fit['verdict']:8s} "
                  f"fluid order {fit['profile'].get('fluid_order', float('nan')):+.3f}", flush=True)
    for name in ("as it is", "FOREIGN inverted"):
        verdicts = [r["verdict"] for r in rows if r["input"] == name]
        print(f"profile     {name}: " + ", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(verdicts))))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--write", help="store the reference in a copy of the model here")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--development", action="store_true", help="also score the development cases' images")
    parser.add_argument("--cases", type=int, default=6, help="how many selection patients to alter")
    parser.add_argument("--others", action="store_true", help="also the liver-ct and carotid-us models")
    parser.add_argument("--inverted-all", action="store_true", help="every brain case as it is and inverted, "
                                                                   "scored by its profile alone")
    args = parser.parse_args()
    from synomaly.files.model_file import load_model, save_model
    from synomaly.inference.input_fit import reference_from
    from synomaly.training.calibration import healthy_volume_scores

    print(f"CPU: {cpu_name()}", flush=True)
    model = load_model(args.model)
    trained_on = {c["case"] for c in model.metadata["training"]["data"]["cases"]}
    fitting, selection = split_patients(training_rows())
    calibration = [row for row in fitting if row["case"] not in trained_on]
    t0 = time.time()
    profiles = healthy_volume_scores(model, load_cases(calibration), "auto")[2]
    reference = reference_from(profiles, "whole volumes of the calibration patients " +
                               ", ".join(row["case"] for row in calibration))
    model.metadata.setdefault("calibration", {})["input_reference"] = reference
    print(f"reference from {len(profiles)} volumes in {time.time() - t0:.0f} s:", flush=True)
    for name, ref in reference["features"].items():
        print(f"  {name:10s} {ref['low']:9.4g} .. {ref['high']:9.4g} (median {ref['median']:.4g})", flush=True)
    if args.write:
        save_model(args.write, model.network.cpu(), model.metadata)
    rows = []
    groups = [("selection", c) for c in load_cases(selection[:args.cases])]
    if args.development:
        groups += [("development", c) for c in load_cases(case_rows("development"))]
    for group, case in groups:
        items = variants(case) if group == "selection" else [("as it is", case.image, case.geometry, case.mask)]
        for name, image, geometry, mask in items:
            row = {"group": group, "case": case.name, "input": name, **run(model, image, geometry, mask)}
            rows.append(row)
            say(group, f"{case.name:22s} {name:26s}", row)
    for name, image, geometry, mask in liver_inputs():
        row = {"group": "foreign", "case": name, "input": name, **run(model, image, geometry, mask)}
        rows.append(row)
        say("foreign", name, row)
    if args.inverted_all:
        rows += inverted_everywhere(model, reference)
    if args.others:
        models = {}
        for name, row_name, image, geometry, mask in other_model_inputs():
            models.setdefault(name, load_model(name))
            row = {"group": name, "case": row_name, "input": row_name, **run(models[name], image, geometry, mask)}
            rows.append(row)
            say(name, row_name, row)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "reference": reference, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
