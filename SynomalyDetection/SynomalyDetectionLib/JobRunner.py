"""A long engine call in a worker process (``python -m synomaly.commands.worker``), driven by polling.

Inside Slicer the main thread holds the GIL while the Qt event loop idles, so the engine cannot run on
a Python thread there; it runs in a process of its own, and no thread is started here. The job folder
holds the request, the inputs and the outputs as files. The main thread calls ``poll()`` (from a
qt.QTimer in the widget, in a loop in ``wait()`` that keeps Slicer's GUI responsive): it reads the
progress lines the worker appended since the last poll, and once the process has ended it reads the
result and runs ``finish``, which writes MRML nodes. Cancel asks the worker to stop (it saves a
training checkpoint) and kills the process and its children if they are still there after ``grace_s``;
a cancelled job never runs ``finish``, so cancelling leaves the scene untouched. Whatever fails while
polling (a progress callback included) fails the job: ``poll()`` never raises, so a caller's error
path cannot leave a process or a job folder behind.

A worker whose Slicer died stops by itself, on every OS: its stdin is a pipe whose write end only the
job holds and never writes to; the OS closes it when Slicer's process ends, however it ends, and the
worker takes the end of the pipe as a stop request (``synomaly.commands.worker``). PythonSlicer's
launcher hands its stdin on to the real interpreter (CTKAppLauncher's ForwardedInputChannel). The pipe
lives as long as the job's process object: a job let go (``release``) was asked to stop already.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

from .Engine import engine_root, errors
from .Messages import panel_wording

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
REQUEST_FILE, PROGRESS_FILE, RESULT_FILE, CANCEL_FILE, LOG_FILE, PID_FILE = (
    "request.json", "progress.jsonl", "result.json", "cancel", "worker.log", "worker.pid")
LOG_TAIL_CHARS = 4000
JOB_PREFIX = "synomaly-job-"
STALE_AFTER_S = 60.0  # a job folder younger than this may still be starting: its PID file is not written yet

_waiting: List["WorkerJob"] = []


def waiting_jobs() -> List["WorkerJob"]:
    """The jobs a ``wait()`` (the Python console's ``detect``/``train``) is blocked on: that wait processes
    GUI events, so the panel must not start another run meanwhile."""
    return list(_waiting)


def gui_events() -> Optional[Callable[[], None]]:
    """Slicer's ``processEvents`` inside the application (a wait there must keep the GUI alive), else None."""
    import slicer

    app = getattr(slicer, "app", None)
    return getattr(app, "processEvents", None)


def jobs_root() -> Path:
    """Where job folders go: Slicer's temporary folder (the user's setting) inside Slicer, the system's
    elsewhere."""
    import slicer

    app = getattr(slicer, "app", None)
    path = getattr(app, "temporaryPath", None)
    return Path(path) if path else Path(tempfile.gettempdir())


def new_job_folder() -> Path:
    """A new job folder, or an OutputError that says where and what to do."""
    root = jobs_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=JOB_PREFIX, dir=str(root)))
    except OSError as exc:
        raise errors().OutputError(f"No job folder can be made in {root} ({exc.strerror or exc}); choose another "
                                   "temporary folder in Slicer's Application Settings (General).") from None


def remove_stale_job_folders(root: Optional[Path] = None, min_age_s: float = STALE_AFTER_S) -> List[Path]:
    """Remove the job folders that a crashed Slicer, or a worker let go at exit, left behind (they hold
    patient images): those whose worker has ended, or that never got one. Returns what was removed."""
    removed = []
    for folder in sorted(Path(root or jobs_root()).glob(JOB_PREFIX + "*")):
        try:
            if not folder.is_dir() or time.time() - folder.stat().st_mtime < min_age_s:
                continue
            pid_text = (folder / PID_FILE).read_text(encoding="utf-8") if (folder / PID_FILE).is_file() else ""
        except OSError:
            continue
        if pid_text.strip().isdigit() and not process_gone(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class WorkerError(RuntimeError):
    """The worker failed in a way the user cannot fix; ``details`` holds its traceback or log."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def worker_python() -> str:
    """The interpreter for the worker: Slicer's own Python inside Slicer, this one elsewhere."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return sys.executable
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidates = [Path(app.slicerHome) / "bin" / name, shutil.which("PythonSlicer"), sys.executable]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and Path(candidate).name.startswith("PythonSlicer"):
            return str(candidate)
    raise WorkerError(f"Slicer's Python interpreter ({name}) was not found in {Path(app.slicerHome) / 'bin'} "
                      "nor on the PATH; reinstall Slicer.")


def worker_error(record: dict) -> Exception:
    """The exception a failed worker's error record stands for: the engine's own error class for errors
    the user can fix (in the panel's words), else a WorkerError carrying the worker's traceback."""
    message = record.get("message") or record.get("type") or "unknown error"
    if record.get("user_error"):
        cls = getattr(errors(), str(record.get("type")), None)
        if isinstance(cls, type) and issubclass(cls, errors().SynomalyError):
            return cls(panel_wording(message))
        return errors().SynomalyError(panel_wording(message))
    return WorkerError(f"{record.get('type', 'Error')}: {message}", record.get("traceback", ""))


def _windows_process_gone(pid: int) -> bool:
    """Windows: no process of that ID, or one that has exited (os.kill would terminate it there)."""
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return True
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value != 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def process_gone(pid: int) -> bool:
    """True once ``pid`` has ended (POSIX: no such process, or a zombie that nobody reaped yet)."""
    if os.name == "nt":
        return _windows_process_gone(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill the worker and whatever it started, then reap it: its PID is gone when this returns."""
    if process.poll() is None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False, creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the worker leads its own process group
            except (ProcessLookupError, PermissionError):
                process.kill()
    process.wait()


class WorkerJob:
    def __init__(self, folder: Path, request: dict, finish: Optional[Callable] = None,
                 on_progress: Optional[Callable] = None, grace_s: float = 0.0, python: Optional[str] = None,
                 after_progress: Optional[Callable[[], None]] = None):
        """``folder``: the job folder, holding the input files; it is removed when the job ends.
        ``request``: the worker's request (see ``synomaly.commands.worker``), paths relative to ``folder``.
        ``finish(result)`` runs on the polling thread with the worker's result (output paths made
        absolute) and returns the job's result; ``on_progress(*args)`` receives, on the polling thread,
        what the engine passed to ``progress``. ``grace_s``: how long a cancelled worker may take to stop
        by itself (a training run saves its checkpoint) before it is killed. ``after_progress()`` runs once
        after the lines of a poll were delivered, so that a plot can redraw once per poll, not per line."""
        self.folder = Path(folder)
        self.request = dict(request, parent_pid=os.getpid(), stop_when_stdin_closes=True)
        self._finish, self._on_progress, self._grace_s = finish, on_progress, grace_s
        self._after_progress = after_progress
        self._python = python
        self._process: Optional[subprocess.Popen] = None
        self._offset = 0
        self._cancel_at: Optional[float] = None
        self.state = RUNNING
        self.result = None
        self.error: Optional[BaseException] = None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def done(self) -> bool:
        return self.state != RUNNING

    @property
    def exited(self) -> bool:
        """The worker has ended and the next poll reads its results (and may write nodes)."""
        return self._process is not None and self._process.poll() is not None

    @property
    def cancelling(self) -> bool:
        return self._cancel_at is not None and not self.done

    def command(self) -> List[str]:
        return [self._python or worker_python(), "-m", "synomaly.commands.worker", str(self.folder / REQUEST_FILE)]

    def start(self) -> "WorkerJob":
        """Write the request and start the worker; on failure the job folder is removed and the error raised."""
        try:
            (self.folder / REQUEST_FILE).write_text(json.dumps(self.request), encoding="utf-8")
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            root = engine_root()
            env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            options = {}
            if os.name == "nt":
                options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
            else:
                options["start_new_session"] = True
            with open(self.folder / LOG_FILE, "wb") as log:
                self._process = subprocess.Popen(self.command(), cwd=str(self.folder), env=env,
                                                 stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                                 **options)
            (self.folder / PID_FILE).write_text(str(self._process.pid), encoding="utf-8")
        except BaseException:
            if self._process is not None:
                kill_process_tree(self._process)
                self._close_pipe()
            self._remove_folder()
            raise
        return self

    def cancel(self) -> None:
        """Ask the worker to stop; without a grace period it is killed now. The job ends as cancelled at
        the next poll after the process has gone."""
        if self.done or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic()
        try:
            (self.folder / CANCEL_FILE).touch()
        except OSError:
            self._grace_s = 0.0
        if self._grace_s <= 0 and self._process is not None:
            kill_process_tree(self._process)

    def stop(self, timeout_s: Optional[float] = None, process_events: Optional[Callable[[], None]] = None) -> None:
        """Cancel and return only once the process is gone (killed after ``timeout_s``, default the grace).
        ``process_events`` (Slicer's, by default inside Slicer) runs while waiting, so the GUI stays alive."""
        self.cancel()
        process_events = process_events if process_events is not None else gui_events()
        deadline = time.monotonic() + (self._grace_s if timeout_s is None else timeout_s)
        while self.poll():
            if time.monotonic() >= deadline:
                kill_process_tree(self._process)
            if process_events is not None:
                process_events()
            time.sleep(0.02)

    def release(self) -> None:
        """Let go of the job without waiting (module reload, Slicer exit): a worker with a grace period is
        asked to stop and ends by itself (training saves its checkpoint first), one without is killed.
        The folder of a worker still stopping is left to ``remove_stale_job_folders``. Its stdin pipe stays
        open: closing it, or Slicer's exit doing so, repeats a stop request that the worker already obeys."""
        if self.done:
            return
        self.cancel()
        if self._process.poll() is None:
            self.state = CANCELLED
            return
        self.poll()

    def poll(self) -> bool:
        """Deliver new progress; once the worker has ended, finish the job. True while running. Never
        raises: an error here (in a progress callback, say) fails the job and stops its worker."""
        if self.done:
            return False
        try:
            self._deliver_progress()
            if self._process.poll() is None:
                if self._cancel_at is not None and time.monotonic() - self._cancel_at >= self._grace_s:
                    kill_process_tree(self._process)
                else:
                    return True
            self._deliver_progress()
            self._complete()
        except Exception as exc:
            kill_process_tree(self._process)
            self.state, self.error = FAILED, exc
        self._close_pipe()
        self._remove_folder()
        return False

    def _close_pipe(self) -> None:
        """The worker's stdin, once it has ended (the pipe is how it would learn that Slicer is gone)."""
        if self._process is not None and self._process.stdin is not None:
            try:
                self._process.stdin.close()
            except OSError:
                pass

    def _deliver_progress(self) -> None:
        """Complete lines added since the last call; a line still being written waits for the next."""
        try:
            with open(self.folder / PROGRESS_FILE, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self._offset += end
        lines = [line for line in data[:end].splitlines() if line.strip()]
        for line in lines:
            args = json.loads(line.decode("utf-8")).get("progress", [])
            if self._on_progress is not None:
                self._on_progress(*args)
        if lines and self._after_progress is not None:
            self._after_progress()

    def _read_result(self) -> Optional[dict]:
        try:
            return json.loads((self.folder / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _log_tail(self) -> str:
        try:
            return (self.folder / LOG_FILE).read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def _complete(self) -> None:
        result = self._read_result()
        if self._cancel_at is not None:
            self.state = CANCELLED
            if result is not None and result.get("status") == "cancelled":  # it stopped by itself
                self.error = errors().Cancelled(panel_wording(result.get("message") or "Cancelled."))
            return
        if result is None:
            self.state = FAILED
            self.error = WorkerError(f"The worker process ended unexpectedly (exit code {self._process.returncode}) "
                                     "without a result; see the details.", self._log_tail())
            return
        status = result.get("status")
        if status == "cancelled":
            self.state, self.error = CANCELLED, errors().Cancelled(panel_wording(result.get("message") or "Cancelled."))
            return
        if status != "succeeded":
            self.state, self.error = FAILED, worker_error(result.get("error") or {})
            return
        if "outputs" in result:
            result["outputs"] = {kind: self.folder / name for kind, name in result["outputs"].items()}
        try:
            self.result = self._finish(result) if self._finish else result
            self.state = SUCCEEDED
        except Exception as exc:
            self.state, self.error = FAILED, exc

    def _remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self, interval_s: float = 0.02, cancel: Optional[Callable[[], bool]] = None,
             process_events: Optional[Callable[[], None]] = None):
        """Poll until done (the Python console, tests); return the result or raise the error (``wait_for``)."""
        return wait_for(self, interval_s, cancel, process_events)


def wait_for(job, interval_s: float = 0.02, cancel: Optional[Callable[[], bool]] = None,
             process_events: Optional[Callable[[], None]] = None):
    """Poll ``job`` (a WorkerJob, or anything polled like one) until done; return its result or raise its error.
    ``cancel()`` is asked between polls; ``process_events`` (Slicer's by default, inside Slicer) runs
    between polls, as ``slicer.util.logProcessOutput`` does, so Slicer stays responsive. An interrupt
    (Ctrl-C) stops the worker before it propagates."""
    process_events = process_events if process_events is not None else gui_events()
    _waiting.append(job)
    try:
        while job.poll():
            if cancel is not None and not job.cancelling and cancel():
                job.cancel()
            if process_events is not None:
                process_events()
            time.sleep(interval_s)
    except BaseException:
        job.stop(process_events=process_events)
        raise
    finally:
        _waiting.remove(job)
    if job.state == SUCCEEDED:
        return job.result
    if job.state == CANCELLED and job.error is None:
        raise errors().Cancelled("Cancelled.")
    raise job.error
