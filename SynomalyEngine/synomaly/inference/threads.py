"""The CPU threads a process may use. Below training and the commands, so that the command line, Slicer's
worker and ``train --nproc`` (which shares them out among its processes) size their pools alike. No torch
import here: the pools are sized before torch starts them."""
import os
import sys
from typing import Optional

from synomaly.errors import InputError


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
