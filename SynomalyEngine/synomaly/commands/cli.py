"""The ``synomaly`` command: detect, train, evaluate, demo. The same engine calls as in Slicer; each command's
options and work live in its own module."""
import argparse
import os
import sys
from typing import List, Optional

from synomaly.commands import demo, detect, evaluate, train
from synomaly.commands.terminal import error_line, log_as_warnings
from synomaly.errors import InputError, SynomalyError


def cpu_share(requested: Optional[int] = None) -> int:
    """Threads for this process: ``--threads`` when given; else the CPUs it may run on (its affinity mask, as
    ``taskset``, a container or a batch system sets it), no more than Slurm gave the task
    (``SLURM_CPUS_PER_TASK``) or ``OMP_NUM_THREADS`` asks for. Runs that share a machine and each size their
    pool as if alone slow each other several times over (two detections on 2 cores: 23.2 s for both, 12.0 s
    with one thread each), so a shared node's runs are given their share this way."""
    if requested is not None:
        if requested < 1:
            raise InputError(f"--threads must be at least 1, got {requested}.")
        return requested
    try:
        share = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        share = os.cpu_count() or 1
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            share = min(share, int(value))
    return max(1, share)


def use_cpu_share(requested: Optional[int] = None) -> int:
    """Size the thread pools of torch (and of the libraries it starts) by ``cpu_share``, before or after torch
    is imported."""
    threads = cpu_share(requested)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def build_parser() -> argparse.ArgumentParser:
    from synomaly import __version__

    parser = argparse.ArgumentParser(prog="synomaly", description="Unsupervised anomaly detection in medical "
                                     "volumes with Synomaly noise and multi-stage diffusion.")
    parser.add_argument("--version", action="version", version=f"synomaly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (detect, train, evaluate, demo):
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log_as_warnings()
    try:
        if getattr(args, "threads", None) is not None or args.command in ("detect", "evaluate", "demo"):
            use_cpu_share(getattr(args, "threads", None))
        return args.func(args)
    except SynomalyError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synomaly: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
