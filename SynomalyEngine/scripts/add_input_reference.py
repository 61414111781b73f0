"""Give a model written before input fit (``inference.input_fit``) its input reference, without touching its
weights, settings, threshold or id: the profiles of whole healthy volumes it was calibrated on.

    python SynomalyEngine/scripts/add_input_reference.py MODEL OUT CASES...   # folders, files or a CSV list
    python SynomalyEngine/scripts/add_input_reference.py MODEL OUT --demo-phantoms
    python SynomalyEngine/scripts/add_input_reference.py liver-ct OUT runs/liver-train.csv --shift-hu 30

``--demo-phantoms``: the demo model's calibration phantoms (``commands.demo.CALIBRATION_SEEDS``), without the
region's size and shape: phantoms are generated at any size (the tests use brains of 30 to 300 mL), so
for the demo model a size is no sign of another kind of input.
``--shift-hu H``: each case also shifted by -H and +H inside its mask (``liver_phantoms.shift_phase``), for a
model trained with that level augmentation (liver-ct: ``intensity_shift`` 0.2 of its 150 HU window, 30 HU),
whose answer holds there (the liver benchmark's +-30 HU volumes): without them every other contrast phase
would be refused.
Models trained now get their reference from their calibration (``training.calibration.calibrate``).
"""
import argparse
import tempfile
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--demo-phantoms", action="store_true")
    parser.add_argument("--shift-hu", type=float, default=0.0)
    parser.add_argument("--source", default=None, help="how the reference volumes are described in the file")
    args = parser.parse_args()
    from synomaly.commands.demo import CALIBRATION_SEEDS, _healthy_phantoms
    from synomaly.files.model_file import load_model, save_model
    from synomaly.inference.input_fit import reference_from
    from synomaly.training.calibration import healthy_volume_scores
    from synomaly.training.cases import find_cases

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo_phantoms:
            cases = find_cases(_healthy_phantoms(Path(tmp), CALIBRATION_SEEDS))
            source = f"whole volumes of the {len(cases)} calibration phantoms (seeds {CALIBRATION_SEEDS.start}-" \
                     f"{CALIBRATION_SEEDS.stop - 1})"
        else:
            cases = find_cases(args.cases)
            source = f"whole volumes of {len(cases)} cases: " + ", ".join(c.name for c in cases)
        if args.shift_hu:
            from synomaly.evaluation.liver_phantoms import shift_phase
            from synomaly.training.cases import TrainingCase

            cases += [TrainingCase(f"{c.name} {sign * args.shift_hu:+g} HU",
                                   shift_phase(c.image, c.mask, sign * args.shift_hu), c.geometry, c.mask, c.labels)
                      for c in list(cases) for sign in (-1, 1)]
            source += f"; each also at -{args.shift_hu:g} and +{args.shift_hu:g} HU inside its mask"
        profiles = healthy_volume_scores(model, cases, "auto")[2]
    if args.demo_phantoms:
        profiles = [{k: v for k, v in p.items() if k not in ("region_ml", "short_mm", "long_mm")} for p in profiles]
    reference = reference_from(profiles, args.source or source)
    model.metadata.setdefault("calibration", {})["input_reference"] = reference
    for name, ref in reference["features"].items():
        print(f"{name:10s} {ref['low']:9.4g} .. {ref['high']:9.4g} (median {ref['median']:.4g})")
    before = model.model_id
    saved = save_model(args.output, model.network.cpu(), model.metadata)
    after = load_model(saved).model_id
    if after != before:
        raise SystemExit(f"the model id changed ({before} -> {after}): the reference must not change the model")
    print(f"{saved}: id {after} kept, reference from {len(profiles)} volumes")


if __name__ == "__main__":
    main()
