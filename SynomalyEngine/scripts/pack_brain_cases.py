"""Write the 28 training patients of the brain recipe into one compressed file, for a GPU machine that
has neither ../shared/data nor SimpleITK (brain_flair_candidates.py --pack reads it).

    python SynomalyEngine/scripts/pack_brain_cases.py runs/brain-pack.npz
"""
import argparse
import os
import tempfile

import numpy as np
from brain_flair_recipe import pack_case, read_case, training_rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    args = parser.parse_args()
    arrays = {}
    for row in training_rows():
        for key, value in pack_case(read_case(row)).items():
            arrays[f"{row['case']}/{key}"] = value
    folder = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
    with os.fdopen(fd, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, args.output)
    print(f"{args.output}: {os.path.getsize(args.output) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
