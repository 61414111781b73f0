"""Train (or resume) a brain FLAIR model on the recipe's training patients.

    python SynomalyEngine/scripts/train_brain_model.py runs/brain-flair.safetensors --steps 2000 [--resume]
    python SynomalyEngine/scripts/train_brain_model.py runs/v1.safetensors --patients v1 --batch-size 8 --steps 1750

``--patients all``: the 28 training patients (the final model of a candidate); ``fit``: the 22 fitting
patients; ``v1``: the 8 the shipped weights trained on. ``--candidate`` names the settings
(brain_flair_candidates.CANDIDATES). Checkpoints every 50 steps in runs/NAME.run/; ``--resume`` continues.
"""
import argparse
import time

from brain_flair_candidates import CANDIDATES
from brain_flair_recipe import V1_PATIENTS, load_cases, split_patients, training_rows, training_settings

from synomaly.training.loop import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patients", choices=("all", "fit", "v1"), default="all")
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), default="skip-small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--pack", default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    rows = training_rows()
    if args.patients == "fit":
        rows = split_patients(rows)[0]
    elif args.patients == "v1":
        rows = [row for row in rows if row["case"] in V1_PATIENTS]
    t0 = time.time()

    def progress(step, total, loss, message):
        if step % 10 == 0 or message in ("calibrating", "done"):
            print(f"{time.time() - t0:8.1f}s {message}", flush=True)

    settings = training_settings(args.steps, args.device, batch_size=args.batch_size, precision=args.precision,
                                 **CANDIDATES[args.candidate])
    train(load_cases(rows, args.pack), args.output, settings, progress=progress, resume=args.resume)


if __name__ == "__main__":
    main()
