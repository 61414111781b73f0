"""Train (or resume) the brain FLAIR model on the recipe's training cases.

    python SynomalyEngine/scripts/train_brain_model.py runs/brain-flair.safetensors --steps 3000 [--resume]

Checkpoints every 50 steps in runs/brain-flair.run/; a later ``--resume`` with a smaller or equal
``--steps`` stops there, calibrates and writes the model.
"""
import argparse
import time

from brain_flair_recipe import TRAINING_CASES, training_settings

from synomaly.training import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    t0 = time.time()

    def progress(step, total, loss, message):
        if step % 10 == 0 or message in ("calibrating", "done"):
            print(f"{time.time() - t0:8.1f}s {message}", flush=True)

    train(TRAINING_CASES, args.output, training_settings(args.steps, args.device), progress=progress,
          resume=args.resume)


if __name__ == "__main__":
    main()
