"""Train (or resume) the liver CT model on the recipe's training cases (liver_ct_recipe.py).

    python SynomalyEngine/scripts/train_liver_model.py runs/liver-ct.safetensors --steps 3000 [--resume]

The same as ``synomaly train runs/liver-train.csv --preset liver-ct --res-blocks 1 --min-slice-foreground 0.01
--lesion-slices mask --lesion-margin-mm 10 --intensity-shift 0.2 --checkpoint-every 50 -o runs/liver-ct.safetensors``
with the CSV this script writes (the training CTs and their copies at 2.5 and 5 mm slices, one group per scan;
1 % of the slice instead of the default 5 %: the liver is small in a whole-abdomen slice). Checkpoints every
50 steps in runs/liver-ct.run/. The recipe's minimum component size (250 mm^3) is not a command-line option:
``synomaly.training.calibration.recalibrate(model, [csv], inference={"min_component_mm3": 250})`` sets it.
"""
import argparse
import time

from liver_ct_recipe import training_settings, write_training_csv

from synomaly.training.loop import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--lesion-slices", choices=("mask", "skip"), default="mask",
                        help="ircad17's tumour slices: train on them with the tumour grown by 10 mm left out "
                             "(default), or leave them out (the ablation)")
    args = parser.parse_args()
    csv_path = write_training_csv()
    t0 = time.time()

    def progress(step, total, loss, message):
        if step % 10 == 0 or message in ("calibrating", "done"):
            print(f"{time.time() - t0:8.1f}s {message}", flush=True)

    train([csv_path], args.output, training_settings(args.steps, args.device, args.lesion_slices), progress=progress,
          resume=args.resume)


if __name__ == "__main__":
    main()
