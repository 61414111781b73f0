"""Train (or resume) the liver CT model on the recipe's training cases.

    python SynomalyEngine/scripts/train_liver_model.py runs/liver-ct.safetensors --steps 1000 [--resume]

The same as ``synomaly train runs/liver-train.csv --preset liver-ct --res-blocks 1 --min-slice-foreground 0.01
-o runs/liver-ct.safetensors`` with the CSV this script writes (1 % of the slice instead of the default 5 %: the
liver is small in a whole-abdomen slice). Checkpoints every 50 steps in runs/liver-ct.run/.
"""
import argparse
import time
from pathlib import Path

from liver_ct_recipe import training_settings, write_training_csv

from synomaly.training.loop import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    csv_path = write_training_csv(Path(args.output).with_name("liver-train.csv"))
    t0 = time.time()

    def progress(step, total, loss, message):
        if step % 10 == 0 or message in ("calibrating", "done"):
            print(f"{time.time() - t0:8.1f}s {message}", flush=True)

    train([csv_path], args.output, training_settings(args.steps, args.device), progress=progress,
          resume=args.resume)


if __name__ == "__main__":
    main()
