"""One detection or training job in a process of its own: ``python -m synomaly.commands.worker REQUEST.json``.

Slicer runs the engine this way: its main thread keeps the GIL while the Qt event loop idles, so the
engine cannot run on a Python thread there. Everything goes through files in the request's folder
(the job folder); relative paths in the request are relative to it.

Request (JSON)::

    {"kind": "detection", "input": "input.nrrd", "mask": "mask.nrrd" or null, "model": NAME_OR_PATH,
     "settings": {DetectionSettings fields}, "parent_pid": PID or null, "stop_when_stdin_closes": false}
    {"kind": "training", "healthy": [PATH or {"name": NAME, "image": PATH, "mask": PATH or absent}, ...],
     "output": MODEL_PATH, "settings": {TrainingSettings fields}, "resume": false, "parent_pid": PID or null,
     "stop_when_stdin_closes": false}

While it runs, the worker appends one JSON line per progress call to ``progress.jsonl``:
``{"progress": [the engine's progress arguments]}``. It stops when the file ``cancel`` appears in the
job folder, on SIGTERM, or when the parent is gone: with ``stop_when_stdin_closes`` its stdin is a pipe
whose write end the parent holds and never writes to, and the end of that pipe (the parent died, on any
OS, or let go of it) is a stop request; with ``parent_pid`` (POSIX) the parent's process gone is one too.
The engine's ``cancel()`` then returns True, so training saves its checkpoint before it stops. The pipe
is opt-in: a worker started by hand or by a script, whose stdin is a terminal or /dev/null, must not stop
at the first read. Last, it writes ``result.json``
atomically: ``{"status": "succeeded", ...}`` with the output files (detection: ``outputs``, by kind,
and ``report``; training: ``model``), ``{"status": "cancelled", "message": ...}``, or
``{"status": "failed", "error": {"type", "message", "user_error", "traceback"}}``.
Exit codes: 0 succeeded, 1 unexpected failure, 2 an error the user can fix, 3 cancelled.
"""
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from synomaly.errors import Cancelled, InputError, SynomalyError

PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel"
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 1, 2, 3
DETECTION_OUTPUTS = ("anomaly_map", "segmentation", "counterfactual", "uncertainty")


class StopRequest:
    """The engine's ``cancel()`` callback: a cancel file, SIGTERM, or the parent gone (the end of the pipe
    it holds, see ``watch``; its process gone, POSIX).

    The pipe works on every OS and whatever killed the parent: the OS closes a dead process's handles. The
    POSIX parent-process check stays as a second way: it still sees the parent go where a fork of the parent
    (one that never ran exec) inherited the pipe's write end and keeps the pipe open."""

    def __init__(self, folder: Path, parent_pid: Optional[int] = None):
        self.cancel_file = folder / CANCEL_FILE
        self.parent_pid = parent_pid if os.name == "posix" else None
        self.signalled = False
        self.pipe_closed = False
        self._parent_checked = 0.0

    def on_signal(self, signum, frame) -> None:
        self.signalled = True

    def watch_stdin(self) -> threading.Thread:
        """Watch the pipe on stdin, moved to a descriptor of its own first: stdin becomes the null device, so
        the engine's own child processes never get the pipe (on Windows a child's start-up could otherwise
        wait on the read this thread keeps pending)."""
        fd = os.dup(0)  # not inheritable (PEP 446)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, 0)
        finally:
            os.close(null)
        return self.watch(fd)

    def watch(self, fd: int) -> threading.Thread:
        """Read the pipe ``fd`` to its end on a daemon thread, then ask to stop. The parent writes nothing:
        whatever comes is read and ignored. A read error counts as the end (a broken pipe on Windows)."""
        def read_to_end():
            try:
                while os.read(fd, 4096):
                    pass
            except OSError:
                pass
            self.pipe_closed = True
            print("synomaly.commands.worker: the parent's end of stdin closed (it ended or let go); stopping.",
                  file=sys.stderr, flush=True)

        thread = threading.Thread(target=read_to_end, name="synomaly-parent-pipe", daemon=True)
        thread.start()
        return thread

    def _parent_gone(self) -> bool:
        now = time.monotonic()
        if self.parent_pid is None or now - self._parent_checked < 1.0:
            return False
        self._parent_checked = now
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def __call__(self) -> bool:
        return self.signalled or self.pipe_closed or self.cancel_file.exists() or self._parent_gone()


class ProgressLog:
    """The engine's ``progress(...)`` callback: one flushed JSON line per call."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def __call__(self, *args) -> None:
        self._file.write(json.dumps({"progress": list(args)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def settings_from_dict(cls, values: dict):
    """A settings dataclass from JSON values: lists become tuples where the field's default is a tuple;
    an unknown name is an InputError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(f"unknown setting(s): {', '.join(unknown)}.")
    converted = {}
    for name, value in values.items():
        default = fields[name].default
        converted[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return cls(**converted)


def run_detection(request: dict, folder: Path, progress: Callable, cancel: Callable) -> dict:
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume, write_volume
    from synomaly.inference.detection import DetectionSettings, detect

    settings = settings_from_dict(DetectionSettings, request.get("settings") or {})
    volume, geometry = read_volume(folder / request["input"])
    mask = None
    if request.get("mask"):
        mask = read_volume(folder / request["mask"])[0] > 0
    if cancel():
        raise Cancelled("detection cancelled.")
    progress(0.0, "loading the model")
    model = load_model(request["model"], device="cpu")
    result = detect(volume, geometry, model, mask=mask, settings=settings, progress=progress, cancel=cancel)
    outputs = {}
    for kind in DETECTION_OUTPUTS:
        array = getattr(result, kind)
        if array is not None:
            outputs[kind] = f"{kind}.nrrd"
            write_volume(folder / outputs[kind], array, geometry)
    return {"outputs": outputs, "report": result.report}


def run_training(request: dict, folder: Path, progress: Callable, cancel: Callable) -> dict:
    from synomaly.training.cases import read_case
    from synomaly.training.loop import train
    from synomaly.training.settings import TrainingSettings

    settings = settings_from_dict(TrainingSettings, request.get("settings") or {})
    healthy = []
    for item in request["healthy"]:
        if isinstance(item, dict):
            mask = folder / item["mask"] if item.get("mask") else None
            healthy.append(read_case(item["name"], folder / item["image"], mask, None))
        else:
            healthy.append(Path(item))
    model = train(healthy, Path(request["output"]), settings, progress=progress, cancel=cancel,
                  resume=bool(request.get("resume")))
    return {"model": str(model)}


RUNNERS = {"detection": run_detection, "training": run_training}


def error_record(exc: BaseException) -> dict:
    user_error = isinstance(exc, SynomalyError)
    return {"type": type(exc).__name__, "message": str(exc), "user_error": user_error,
            "traceback": "" if user_error else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def write_result(folder: Path, result: dict) -> None:
    from synomaly.files.volume_io import atomic_write_bytes

    atomic_write_bytes(folder / RESULT_FILE, (json.dumps(result, default=str) + "\n").encode("utf-8"))


def run(request_path: Path) -> int:
    """Run the job; the outcome is in ``result.json`` and the exit code."""
    folder = request_path.parent
    try:
        request = json.loads(request_path.read_text(encoding="utf-8"))
        runner = RUNNERS.get(request.get("kind"))
        if runner is None:
            raise InputError(f"unknown job kind {request.get('kind')!r}; use one of {', '.join(RUNNERS)}.")
    except (OSError, ValueError) as exc:
        print(f"synomaly.commands.worker: error: {request_path}: not a readable job request ({exc}).",
              file=sys.stderr)
        return EXIT_USER_ERROR
    from synomaly.inference.threads import use_cpu_share

    use_cpu_share()  # Slicer's worker beside a CLI run on one machine is the normal case: each takes its share
    stop = StopRequest(folder, request.get("parent_pid"))
    signal.signal(signal.SIGTERM, stop.on_signal)
    if request.get("stop_when_stdin_closes"):
        stop.watch_stdin()
    progress = ProgressLog(folder / PROGRESS_FILE)
    try:
        result, code = dict(runner(request, folder, progress, stop), status="succeeded"), EXIT_OK
    except Cancelled as exc:
        message = str(exc)
        if request.get("kind") == "training":
            message += "; resume to continue"
        result, code = {"status": "cancelled", "message": message}, EXIT_CANCELLED
    except Exception as exc:
        user_error = isinstance(exc, SynomalyError)
        result = {"status": "failed", "error": error_record(exc)}
        code = EXIT_USER_ERROR if user_error else EXIT_FAILED
        print(result["error"]["traceback"] or f"synomaly.commands.worker: error: {exc}", file=sys.stderr)
    finally:
        progress.close()
    write_result(folder, result)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m synomaly.commands.worker REQUEST.json", file=sys.stderr)
        return EXIT_USER_ERROR
    return run(Path(argv[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
