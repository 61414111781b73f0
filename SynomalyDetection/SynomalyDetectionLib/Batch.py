"""Several volumes analysed one after another, driven like one worker job.

The panel polls a batch from its timer as it polls a WorkerJob, and ``SynomalyLogic.detect_many`` waits
for one: both take this one path. Every input is checked before the first worker starts; the progress
is one for the whole batch; each volume's outputs are written as soon as its run ends. A failure or a
cancel stops the batch, and the outputs of the volumes done by then stay.
"""
from typing import Callable, List, Optional

from . import MrmlBridge
from .Engine import errors
from .JobRunner import CANCELLED, FAILED, RUNNING, SUCCEEDED, wait_for


class DetectionBatch:
    def __init__(self, logic, volume_nodes, mask_node=None, model=None, replace: bool = False,
                 on_progress: Optional[Callable] = None, remember: bool = False, **settings):
        """``logic``: the SynomalyLogic that prepares and starts each run. ``replace``: each volume's last
        outputs are overwritten instead of adding new nodes. ``on_progress(fraction of the batch, message)``
        runs on the polling thread. ``remember``: the parameter node keeps the last outputs and report (the
        panel). ``settings``: the engine's DetectionSettings, the same for every volume."""
        self.nodes = list(volume_nodes or [])
        self._logic, self._mask, self._model, self._replace = logic, mask_node, model, replace
        self._on_progress, self._remember, self._settings = on_progress, remember, settings
        self._job = None
        self._cancel_requested = False
        self.results: List[MrmlBridge.OutputNodes] = []
        self.state = RUNNING
        self.result = None
        self.error: Optional[BaseException] = None

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    @property
    def exited(self) -> bool:
        """The current worker has ended and the next poll reads its results (and writes nodes)."""
        return self._job is not None and self._job.exited

    @property
    def cancelling(self) -> bool:
        return self._cancel_requested and not self.done

    @property
    def pid(self) -> Optional[int]:
        return self._job.pid if self._job is not None else None

    @property
    def stopped_at(self) -> str:
        """The name of the volume whose run failed or was cancelled ("" while running or after success)."""
        if self.state in (RUNNING, SUCCEEDED) or self.current >= len(self.nodes):
            return ""
        return self.nodes[self.current].GetName()

    @property
    def current(self) -> int:
        """The index of the volume being analysed (the number done so far)."""
        return len(self.results)

    def start(self) -> "DetectionBatch":
        """Check every input, then start the first run; raises before any run when an input is wrong."""
        if not self.nodes:
            raise errors().InputError("No input volumes: choose the volumes to analyse.")
        for node in self.nodes:
            self._logic.check_detection_input(node, self._mask, self._model)
        self._start_next()
        return self

    def _start_next(self) -> None:
        index, node = self.current, self.nodes[self.current]
        count, name = len(self.nodes), node.GetName()

        def part(fraction, message):
            if self._on_progress is not None:
                self._on_progress((index + fraction) / count, f"[{index + 1}/{count}] {name}: {message}")

        MrmlBridge.check_input_volume(node)  # still in the scene: the batch may have run for minutes
        reuse = MrmlBridge.latest_outputs(node) if self._replace else None
        request = self._logic.prepare_detection(node, self._mask, self._model, reuse, **self._settings)
        self._job = self._logic.start_detection_job(request, part, remember=self._remember)

    def poll(self) -> bool:
        """Poll the current run; when it has succeeded start the next one. True while running. Never raises:
        a volume that cannot be started (removed from the scene meanwhile, say) fails the batch."""
        if self.done:
            return False
        if self._job.poll():
            return True
        if self._job.state != SUCCEEDED:
            self.state, self.error = self._job.state, self._job.error
            return False
        self.results.append(self._job.result)
        if self.current == len(self.nodes):
            self.state, self.result = SUCCEEDED, list(self.results)
            return False
        if self._cancel_requested:
            self.state = CANCELLED
            return False
        try:
            self._start_next()
        except Exception as exc:
            self.state, self.error = FAILED, exc
            return False
        return True

    def cancel(self) -> None:
        """Stop the current run (it adds nothing) and start no other."""
        if not self.done:
            self._cancel_requested = True
            self._job.cancel()

    def stop(self, timeout_s: Optional[float] = None, process_events: Optional[Callable[[], None]] = None) -> None:
        """Cancel and return once the current worker has gone."""
        self.cancel()
        if self._job is not None:
            self._job.stop(timeout_s, process_events)
        self.poll()

    def release(self) -> None:
        """Let go without waiting (module reload, Slicer exit): the current worker is stopped as a WorkerJob's."""
        if self.done:
            return
        self._cancel_requested = True
        self._job.release()
        self.poll()

    def wait(self, interval_s: float = 0.02, cancel: Optional[Callable[[], bool]] = None,
             process_events: Optional[Callable[[], None]] = None) -> List[MrmlBridge.OutputNodes]:
        """Poll until done; the outputs of every volume, or the error of the run that stopped the batch."""
        return wait_for(self, interval_s, cancel, process_events)


def finished_outputs(job) -> List[MrmlBridge.OutputNodes]:
    """The outputs a finished detection wrote: a batch's (all, or those done before it stopped), one job's
    (none when it failed or was cancelled)."""
    if isinstance(job, DetectionBatch):
        return list(job.results)
    return [job.result] if job.state == SUCCEEDED and job.result is not None else []
