"""Peak memory of ``synomaly detect`` on a mostly empty volume: a small phantom brain (uint8, skull-stripped)
alone, and the same brain in the middle of large empty fields (512 x 512 x 200 and 1024 x 1024 x 400 voxels by
default), each written as a real NIfTI file and detected by a real ``synomaly detect`` process.

The peak resident memory of each process (its ``ru_maxrss``, from ``wait4``) is printed beside the input's size
(as stored, uint8, and as float32) and beside the run on the brain alone, whose peak is the cost of Python,
torch and the model: what an empty field adds is the difference. The CPU's name comes first.

    python SynomalyEngine/scripts/memory_benchmark.py [--sizes 512x512x200 1024x1024x400] [--model demo-phantom]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["512x512x200", "1024x1024x400"],
                   help="empty fields, x by y by z voxels, the brain in their middle")
    p.add_argument("--model", default="demo-phantom")
    p.add_argument("--work", default=None, help="folder for the volumes and outputs (default: a temporary one)")
    p.add_argument("--write-into", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def brain_uint8():
    """The demo phantom's brain as uint8 (background exactly 0, as skull-stripped volumes have it)."""
    from synomaly.evaluation.phantom import make_phantom

    phantom = make_phantom(seed=5, lesion=True)
    scaled = np.clip(phantom.volume / np.percentile(phantom.volume, 99.9) * 200.0, 0, 255)
    return np.rint(scaled).astype(np.uint8), phantom.geometry


def padded(brain: np.ndarray, size_xyz) -> np.ndarray:
    """``brain`` in the middle of a zero field of ``size_xyz`` voxels."""
    field = np.zeros(tuple(reversed(size_xyz)), dtype=np.uint8)
    start = [(f - b) // 2 for f, b in zip(field.shape, brain.shape)]
    field[tuple(slice(s, s + b) for s, b in zip(start, brain.shape))] = brain
    return field


def peak_rss(path: Path, out: Path, model: str):
    """(peak resident memory in bytes, seconds) of one ``synomaly detect`` process on ``path``."""
    args = [sys.executable, "-m", "synomaly", "detect", str(path), "-o", str(out), "--model", model, "--overwrite",
            "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    error = proc.stderr.read().decode(errors="replace").strip()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"detection of {path.name} failed (exit {proc.returncode}): {error}")
    return usage.ru_maxrss * 1024, seconds  # Linux gives kilobytes


def write_inputs(folder: Path, sizes) -> None:
    """The brain alone and in each field, as NIfTI files in ``folder``; the CPU's name and the brain's size
    (z y x) on the first two lines."""
    from synomaly.files.volume_io import write_volume
    from synomaly.inference.runtime import cpu_name

    print(cpu_name())
    brain, geometry = brain_uint8()
    print(*brain.shape)
    write_volume(folder / "brain.nii.gz", brain, geometry)
    for size in sizes:
        write_volume(folder / f"field_{size}.nii.gz", padded(brain, size_xyz(size)), geometry)


def size_xyz(size: str):
    return tuple(int(n) for n in size.lower().split("x"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_into:
        write_inputs(Path(args.write_into), args.sizes)
        return 0
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        # Written by another process: a child started from this one would inherit its peak (Linux counts the
        # memory of the process that started it in a child's ru_maxrss), so this one stays small.
        written = subprocess.run([sys.executable, __file__, "--write-into", str(tmp), "--sizes", *args.sizes],
                                 capture_output=True, text=True, check=True)
        cpu, brain_shape = written.stdout.splitlines()[:2]
        print(f"CPU: {cpu}; model {args.model}")
        brain_shape = tuple(int(n) for n in brain_shape.split())
        inputs = [("brain alone", brain_shape, tmp / "brain.nii.gz")]
        inputs += [(f"brain in {size}", tuple(reversed(size_xyz(size))), tmp / f"field_{size}.nii.gz")
                   for size in args.sizes]
        print("| input | voxels | uint8 (MB) | float32 (MB) | peak RSS (MB) | peak / uint8 | above brain alone (MB) "
              "| above / float32 | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        reference = None
        for name, shape, path in inputs:
            peak, seconds = peak_rss(path, tmp / "out", args.model)
            voxels = int(np.prod(shape))
            reference = peak if reference is None else reference
            print(f"| {name} | {voxels:,} | {voxels / 1e6:.1f} | {4 * voxels / 1e6:.1f} | {peak / 1e6:.0f} | "
                  f"{peak / voxels:.1f} | {(peak - reference) / 1e6:.0f} | {(peak - reference) / (4 * voxels):.2f} | "
                  f"{seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
