"""Training on several processes: PyTorch DistributedDataParallel, launched by torchrun.

torchrun starts one process per GPU (or per share of the CPU) and tells each its place in the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A ``Team`` is that place.
Every process draws the whole batch from the shared seeded generator, so that the generator, the
checkpoints and a resume stay the same whatever the process count, and trains on its contiguous share
of it; each share's loss is weighted by its size before DistributedDataParallel averages the
gradients, so the update is the one-process update of the whole batch up to floating-point rounding.
Rank 0 alone writes files. Control messages (agreeing on errors and stop requests, the reported loss)
go over gloo on the CPU, gradients over NCCL between GPUs or gloo between CPUs.

A process not started by torchrun, or started alone, is a team of one and never touches
torch.distributed, so one-process training is unchanged.
"""
import logging
import os
import sys
import uuid
from contextlib import contextmanager
from typing import Optional, Sequence

from synomaly.errors import InputError, SynomalyError


class PeerFailed(SynomalyError):
    """Another training process failed and reports why; this one stops without repeating the message."""


LAUNCH_HINT = "start several training processes with torchrun or synomaly train --nproc N"


def _whole(name: str, default: Optional[int] = None) -> int:
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        what = "is not set" if value is None else f"is {value!r}, not a whole number"
        raise InputError(f"the environment variable {name} {what}; {LAUNCH_HINT}.") from None


def in_team_process() -> bool:
    """Whether torchrun (or ``--nproc``) started this process as one of several; never raises."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def check_share(processes: int, batch_size: int) -> None:
    """Every process needs at least one slice of every batch."""
    if batch_size < processes:
        raise InputError(f"{processes} training processes but a batch size of {batch_size}: each process trains on "
                         f"its share of every batch; give a batch size of at least {processes}, or start fewer "
                         "processes.")


class Team:
    """This process's place among the training processes that share one run."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.device = None
        self._joined = False

    @classmethod
    def from_environment(cls) -> "Team":
        """The team torchrun describes in the environment; a team of one without it."""
        world = _whole("WORLD_SIZE", 1)
        if world <= 1:
            return cls()
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise InputError(f"WORLD_SIZE is {world} but {name} is not set; {LAUNCH_HINT}, or unset WORLD_SIZE.")
        return cls(_whole("RANK"), world, _whole("LOCAL_RANK"), _whole("LOCAL_WORLD_SIZE", world))

    @property
    def main(self) -> bool:
        """The process that writes files and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def join(self) -> None:
        """Meet the other processes (gloo, for control messages on the CPU)."""
        if self.distributed and not self._joined:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size)
            self._joined = True

    def leave(self) -> None:
        if self._joined:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._joined = False

    def resolve_device(self, name: str):
        """The device ``name`` means for this process: with several processes, CUDA means the GPU of its
        local rank (one GPU per process)."""
        import torch

        from synomaly.inference.detection import resolve_device

        device = resolve_device(name)
        if self.distributed and device.type == "mps":
            raise InputError(f"--device mps trains in one process only ({self.world_size} were started): "
                             "DistributedDataParallel has no backend for Apple's GPU; train in one process.")
        if not self.distributed or device.type != "cuda":
            self.device = device
            return device
        if device.index is not None:
            raise InputError(f"--device {name} names one GPU, but each of the {self.world_size} training "
                             "processes uses the GPU of its local rank; give --device cuda or auto.")
        count = torch.cuda.device_count()
        if self.local_world_size > count:
            raise InputError(f"{self.local_world_size} training processes on this machine but {count} GPU(s); "
                             f"start at most {count} per machine (--nproc, torchrun --nproc_per_node) or train "
                             "on the CPU (--device cpu).")
        self.device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(self.device)
        return self.device

    @contextmanager
    def together(self):
        """Preparation that every process does alike: an error in any one stops them all, reported once
        (the first failed rank raises its error, the others PeerFailed). Leaving the block is a barrier,
        so nothing is written before every process has checked the run as it was; it also refuses a
        team whose processes train on different kinds of device."""
        if not self.distributed:
            yield
            return
        self.join()
        error = None
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - shared with the other processes, then raised again
            error = exc
        import torch
        import torch.distributed as dist

        cuda = self.device is not None and self.device.type == "cuda"
        states = [torch.zeros(2, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(states, torch.tensor([int(error is not None), int(cuda)]))
        failed = [rank for rank, state in enumerate(states) if state[0]]
        if failed:
            if error is not None and self.rank == failed[0]:
                raise error
            raise PeerFailed(f"training process {failed[0]} failed (its message above); all "
                             f"{self.world_size} processes stop.")
        on_cuda = [rank for rank, state in enumerate(states) if state[1]]
        if 0 < len(on_cuda) < self.world_size:
            if self.main:
                raise InputError(f"mixed devices: training processes {', '.join(map(str, on_cuda))} would train "
                                 "on a GPU and the others on the CPU; give every process the same --device, cuda "
                                 "on machines with a GPU per process or cpu everywhere.")
            raise PeerFailed("mixed devices (see the message of process 0).")

    def share(self, batch_size: int):
        """This process's contiguous part of a batch, and its weight: the share of the batch relative to
        an even split, so that averaging the weighted losses over processes gives the batch's mean loss."""
        start, stop = self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size
        return slice(start, stop), self.world_size * (stop - start) / batch_size

    def wrap(self, network):
        """The module to train: the network itself alone, DistributedDataParallel in a team (NCCL
        between GPUs, gloo between CPUs)."""
        if not self.distributed:
            return network
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            return DistributedDataParallel(network, device_ids=[self.device.index],
                                           process_group=dist.new_group(backend="nccl"))
        return DistributedDataParallel(network)

    def mean(self, value: float, weight: float = 1.0) -> float:
        """The mean over processes of ``value * weight`` (the batch's mean loss from the shares' losses)."""
        if not self.distributed:
            return value
        import torch
        import torch.distributed as dist

        total = torch.tensor([value * weight], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def any(self, flag: bool) -> bool:
        """True in every process when it is true in any (a stop request reaches all at the same step)."""
        if not self.distributed:
            return flag
        import torch
        import torch.distributed as dist

        flags = torch.tensor([int(bool(flag))])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def launch(nproc: int, args: Sequence[str], threads: Optional[int] = None) -> int:
    """Run ``python -m synomaly ARGS`` in ``nproc`` processes on this machine, as ``torchrun --standalone
    --nproc_per_node NPROC`` does, and return the exit code of the process that failed (0 when all
    succeeded). Each process runs ``threads`` CPU threads (``--threads``), else an even part of the CPUs
    this one may use (``cpu_share``: affinity, Slurm's task, ``OMP_NUM_THREADS``), at least one. The
    processes print their own messages; Ctrl-C and SIGTERM are passed on to them, so they save a
    checkpoint and stop together (exit code 130)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from synomaly.inference.threads import cpu_share

    # torchrun's log (rendezvous, workers failing and being stopped) repeats what the processes and the
    # exit code say.
    elastic, silent = logging.getLogger("torch.distributed.elastic"), logging.NullHandler()
    elastic.addHandler(silent)
    elastic.propagate = False
    # The processes inherit this; sized as if alone, each would take every CPU of a Slurm task or taskset.
    os.environ["OMP_NUM_THREADS"] = str(threads if threads is not None else max(1, cpu_share() // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "synomaly", *args)
    except ChildFailedError as exc:
        # A process that exits with a code has said why; the others may have been stopped by a signal.
        said = sorted(rank for rank, failure in exc.failures.items() if failure.exitcode > 0)
        if said:
            return exc.failures[said[0]].exitcode
        rank, failure = exc.get_first_failure()
        raise SynomalyError(f"training process {rank} was ended by signal {-failure.exitcode} (out of memory?); "
                            "the others were stopped. Continue from the last checkpoint with --resume.") from None
    except SignalException:
        return 130
    finally:
        elastic.removeHandler(silent)
        elastic.propagate = True
    return 0
