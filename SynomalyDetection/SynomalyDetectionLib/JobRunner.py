"""A long engine call on a worker thread, driven by polling from the main thread.

The worker only computes on numpy arrays; it reports progress into a queue. The main thread calls
``poll()`` (from a qt.QTimer in the widget, or in a loop in ``wait()``): progress callbacks and the
``finish`` step, which writes MRML nodes, therefore run on the main thread. A cancelled job never
runs ``finish``, so cancelling leaves the scene untouched.
"""
import queue
import threading
import time
from typing import Callable, Optional

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


class BackgroundJob:
    def __init__(self, work: Callable, finish: Optional[Callable] = None,
                 on_progress: Optional[Callable] = None, cancelled_error: Optional[type] = None, name: str = "Synomaly job"):
        """``work(progress, cancel)`` runs on the worker thread and returns a raw result;
        ``finish(raw)`` runs on the polling thread and returns the job's result;
        ``on_progress(*args)`` receives, on the polling thread, what the worker passed to ``progress``;
        ``cancelled_error`` is the exception type by which ``work`` says it stopped on request."""
        self._work, self._finish, self._on_progress = work, finish, on_progress
        self._cancelled_error = cancelled_error
        self._events = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._raw = None
        self._worker_error = None
        self.state = RUNNING
        self.result = None
        self.error: Optional[BaseException] = None

    def start(self) -> "BackgroundJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the worker to stop; the job ends as cancelled at the next poll after it has stopped."""
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    def _run(self) -> None:
        try:
            self._raw = self._work(lambda *args: self._events.put(args), self._cancel.is_set)
        except BaseException as exc:  # handed to the main thread, which decides what to show
            self._worker_error = exc

    def poll(self) -> bool:
        """Deliver pending progress; once the worker has ended, finish the job. True while running."""
        if self.done:
            return False
        self._deliver_progress()
        if self._thread.is_alive():
            return True
        self._thread.join()
        self._deliver_progress()
        self._complete()
        return False

    def _deliver_progress(self) -> None:
        while True:
            try:
                args = self._events.get_nowait()
            except queue.Empty:
                return
            if self._on_progress is not None:
                self._on_progress(*args)

    def _complete(self) -> None:
        error = self._worker_error
        if self._cancel.is_set() or (self._cancelled_error and isinstance(error, self._cancelled_error)):
            self.state = CANCELLED
            self.error = error
            return
        if error is not None:
            self.state, self.error = FAILED, error
            return
        try:
            self.result = self._finish(self._raw) if self._finish else self._raw
            self.state = SUCCEEDED
        except Exception as exc:
            self.state, self.error = FAILED, exc

    def wait(self, interval_s: float = 0.05):
        """Poll until done (for the Python console and tests); return the result or raise the error."""
        while self.poll():
            time.sleep(interval_s)
        if self.state == SUCCEEDED:
            return self.result
        if self.state == CANCELLED and self.error is None:
            raise (self._cancelled_error or RuntimeError)("Cancelled.")
        raise self.error
