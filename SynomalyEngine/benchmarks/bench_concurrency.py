"""Several detections at once on one machine (a cohort's shards on a node, Slicer's worker beside a CLI run):
the wall time for all of them when each sizes its thread pool as if alone (every CPU) against each taking its
share (``--threads``, or an affinity mask or SLURM_CPUS_PER_TASK set by a scheduler), beside one run alone.

Each run is a real ``synomaly detect`` process on the same phantom with the demo model, so start-up, reading
and writing count as a user meets them. The CPU's name comes first; the rows are measured in this one run.

Run:  python SynomalyEngine/benchmarks/bench_concurrency.py [--runs 2 4] [--repeats 2]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, nargs="+", default=[2, 4], help="how many detections at once")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="demo-phantom")
    return p.parse_args(argv)


def wall(inputs, out: Path, model: str, threads) -> float:
    """Start one detection per input at once; the seconds until the last one ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    t0 = time.perf_counter()
    procs = []
    for i, path in enumerate(inputs):
        extra = ["--threads", str(threads)] if threads else []
        procs.append(subprocess.Popen([sys.executable, "-m", "synomaly", "detect", str(path), "-o", str(out / str(i)),
                                       "--model", model, "--overwrite", "-q", *extra], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a detection failed: {err.strip()}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    from synomaly.inference.threads import cpu_share
    from synomaly.evaluation.phantom import write_phantom_case
    from synomaly.inference.runtime import describe_cpu

    cpus = cpu_share()
    print(f"CPU: {describe_cpu()}; {cpus} CPUs for this process")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        case = write_phantom_case(tmp / "case", seed=5, lesion=True)["flair"]
        alone = statistics.median(wall([case], tmp / "alone", args.model, None) for _ in range(args.repeats))
        print(f"1 detection alone: {alone:.1f} s")
        print("| at once | each as if alone (s) | each its share (s) | share / as if alone | vs one after another |")
        print("|---|---|---|---|---|")
        for n in args.runs:
            inputs = [case] * n
            greedy = statistics.median(wall(inputs, tmp / f"g{n}", args.model, None) for _ in range(args.repeats))
            shared = statistics.median(wall(inputs, tmp / f"s{n}", args.model, max(1, cpus // n))
                                       for _ in range(args.repeats))
            print(f"| {n} | {greedy:.1f} | {shared:.1f} | {shared / greedy:.2f}x | {n * alone:.1f} s in a row |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
