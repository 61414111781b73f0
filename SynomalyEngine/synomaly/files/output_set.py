"""Outputs written as a set: the files of one run appear together, or not at all.

A run holds a lock per set (``.NAME.lock`` in the output folder, created exclusively and naming
its process) from before any work until its files are in place, so a second run into the same
folder refuses instead of mixing two sets. Files are written into a hidden staging folder
(``.NAME.partial``) and moved into place at the end, the report last, with Ctrl-C held back for
those few renames. A run killed outright (SIGKILL, a crash) leaves its lock and staging folder
behind; the next run finds the lock's process gone and removes both, and any file the dead run
had begun to move, so nothing half-written blocks it. Of several runs that find the same dead lock at
once only one can rename it away, and it removes the dead run's files only once the lock is its own,
so none removes what another has just written. A process on another machine (runs sharing a
folder on a cluster) cannot be asked whether it lives: a held lock is touched every ``HEARTBEAT_S``,
and one untouched for ``STALE_AFTER_S`` by the folder's clock is a dead run's.
"""
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from synomaly.errors import OutputError

log = logging.getLogger(__name__)
UNREADABLE_LOCK_GRACE_S = 60.0  # a lock without content may be one being written this instant
HEARTBEAT_S = 30.0  # a held lock's modification time is refreshed this often...
STALE_AFTER_S = 300.0  # ...so one of another machine left this long unrefreshed belongs to a dead run


def _folder_clock(folder: Path) -> Optional[float]:
    """The time by the folder's file system (a new file's mtime): on a shared file system it is
    the server's, the clock that stamped the lock, whatever this machine's own clock says."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=str(folder))
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _alive(pid: int, host: str, lock: Path) -> bool:
    """Whether the lock's process still runs; one on another machine while it refreshes its lock."""
    if host != socket.gethostname():
        now = _folder_clock(lock.parent)
        try:
            return now is None or now - lock.stat().st_mtime < STALE_AFTER_S
        except FileNotFoundError:  # released this instant: not a dead run's to clean up
            return True
    if pid == os.getpid():
        return True
    if os.name == "nt":
        import ctypes

        kernel = ctypes.windll.kernel32
        handle = kernel.OpenProcess(0x1000 | 0x00100000, False, pid)  # QUERY_LIMITED_INFORMATION | SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _signals_held():
    """Defer Ctrl-C and SIGTERM for a few renames, so an interruption cannot split a set."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = mask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


class OutputFolder:
    """Creates the output folder (and missing parents) on entry; on exit removes the folders it
    created if they are still empty, so a run that wrote nothing leaves nothing behind."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.created: List[Path] = []

    def __enter__(self) -> "OutputFolder":
        missing = []
        folder = self.folder
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:  # another run (a shard started at the same moment) made it first
                    if not folder.is_dir():
                        raise
                    continue
                self.created.append(folder)
        except OSError as exc:
            self._remove_empty()
            raise OutputError(f"output folder {self.folder} cannot be created ({exc.strerror or exc}); "
                              "choose another with -o.") from None
        return self

    def _remove_empty(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or gone): keep it and its parents

    def __exit__(self, *exc) -> None:
        self._remove_empty()


class OutputSet:
    """One set of output files in ``folder``, named ``name`` for its lock and staging folder.

    ``with OutputSet(folder, name) as out:`` takes the lock (OutputError when another live run
    holds it); write files into ``out.stage(final_path)`` or the folder ``out.staging``; ``out.commit()``
    moves them into place. Leaving the block removes the lock and whatever was not committed.
    """

    def __init__(self, folder, name: str):
        self.folder = Path(folder)
        self.name = name
        self.lock = self.folder / f".{name}.lock"
        self.staging = self.folder / f".{name}.partial"
        self.held = False
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self._stop_beating = threading.Event()

    # the lock

    def _read_lock(self, path: Path) -> Tuple[Optional[dict], tuple, float]:
        """The owner named in a lock file (None when unreadable), what tells this very file from any
        later lock (inode, modification time, content) and its modification time."""
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
        try:
            owner = json.loads(data.decode("utf-8"))
        except ValueError:
            owner = None
        if not (isinstance(owner, dict) and isinstance(owner.get("pid"), int)):
            owner = None
        return owner, (stat.st_ino, stat.st_mtime_ns, data), stat.st_mtime

    def _owner(self) -> Optional[dict]:
        try:
            return self._read_lock(self.lock)[0]
        except OSError:
            return None

    def _write_lock(self, committing: Iterable[str] = ()) -> None:
        content = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                   "committing": sorted(committing)}
        tmp = self.folder / f".{self.name}.lock.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(content), encoding="utf-8")
        os.replace(tmp, self.lock)

    def _unwritable(self, exc: OSError) -> OutputError:
        return OutputError(f"output folder {self.folder} cannot be written ({exc.strerror or exc}); "
                           "choose another with -o.")

    def _refuse(self, owner: Optional[dict]) -> None:
        who = (f"process {owner['pid']} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
               if owner else "a process that is starting")
        raise OutputError(f"another synomaly run ({who}) is writing {self.name} outputs in {self.folder}; wait for "
                          f"it to finish or use another -o folder (if no run is active, delete {self.lock}).")

    def _claim_dead_lock(self) -> Optional[Tuple[Optional[dict], Path]]:
        """Take a dead run's lock out of the way: renamed to a name of this process's, which only one
        of several runs that found it dead at once can do, and checked to be the very file judged dead
        (a live run may have taken the lock in between). Returns its owner and new path, or None to
        try again; refuses when the lock's run lives."""
        try:
            owner, identity, mtime = self._read_lock(self.lock)
        except FileNotFoundError:
            return None
        except OSError:
            self._refuse(None)
        if owner is None:
            if time.time() - mtime < UNREADABLE_LOCK_GRACE_S:
                self._refuse(None)
        elif _alive(owner["pid"], str(owner.get("host", "")), self.lock):
            self._refuse(owner)
        claimed = self.folder / f".{self.name}.lock.{os.getpid()}-{threading.get_ident()}.dead"
        try:
            os.rename(self.lock, claimed)
        except FileNotFoundError:  # another run claimed it first
            return None
        try:
            same = self._read_lock(claimed)[1] == identity
        except FileNotFoundError:
            return None
        if not same:  # the lock of a run that started meanwhile: put it back
            try:
                os.link(claimed, self.lock)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not self.lock.exists():
                    os.replace(claimed, self.lock)
            with contextlib.suppress(FileNotFoundError):
                claimed.unlink()
            return None
        return owner, claimed

    def _clear_dead_run(self, owner: Optional[dict], claimed: Path) -> None:
        """With the lock held: remove the files a dead run was moving into place, and its old lock."""
        moved = []
        for name in (owner or {}).get("committing", []):
            path = self.folder / Path(name).name
            if path.is_file():
                path.unlink()
                moved.append(path.name)
        if moved:
            log.warning(f"removed {', '.join(moved)} in {self.folder}: the incomplete outputs of an interrupted "
                        f"run (process {owner['pid']})")
        with contextlib.suppress(FileNotFoundError):
            claimed.unlink()

    def _create_lock(self) -> int:
        try:
            return os.open(str(self.lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise
        except OSError as exc:
            raise self._unwritable(exc) from None

    def acquire(self) -> "OutputSet":
        for _ in range(3):
            dead = None
            try:
                fd = self._create_lock()
            except FileExistsError:
                dead = self._claim_dead_lock()
                if dead is None:
                    continue
                try:
                    fd = self._create_lock()
                except FileExistsError:  # another run took the freed lock first: the set is its now
                    with contextlib.suppress(FileNotFoundError):
                        dead[1].unlink()
                    continue
            os.close(fd)
            self.held = True
            try:
                self._write_lock()
            except OSError as exc:
                self.release()
                raise self._unwritable(exc) from None
            if dead is not None:
                self._clear_dead_run(*dead)
            shutil.rmtree(self.staging, ignore_errors=True)
            try:
                self.staging.mkdir()
            except OSError as exc:
                self.release()
                raise self._unwritable(exc) from None
            self._stop_beating = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._stop_beating,), daemon=True,
                             name=f"synomaly lock {self.name}").start()
            return self
        self._refuse(self._owner())

    def _heartbeat(self, stop: threading.Event) -> None:
        """Touch the lock while it is held, so that runs on other machines see this one alive."""
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.lock)

    def release(self) -> None:
        """Drop what was not committed and the lock."""
        self._stop_beating.set()
        if not self.held:
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.lock.unlink()
        self.held = False

    def __enter__(self) -> "OutputSet":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # the files

    def stage(self, final) -> Path:
        """Where to write the file that will become ``final`` (a file of this set's folder)."""
        final = Path(final)
        if final.parent.resolve() != self.folder.resolve():
            raise ValueError(f"{final} is not in {self.folder}")
        return self.staging / final.name

    def commit(self, last: Iterable = (), obsolete: Iterable = ()) -> List[Path]:
        """Move every staged file into place, those named in ``last`` at the end in that order (the
        report: its presence marks a complete set), and remove ``obsolete`` files of an earlier set.
        The lock lists the files meanwhile, so that a run killed halfway is cleaned up after."""
        last_names = [Path(p).name for p in last]
        staged = sorted(p.name for p in self.staging.iterdir()) if self.staging.is_dir() else []
        order = [n for n in staged if n not in last_names] + [n for n in last_names if n in staged]
        for name in order:
            if (self.folder / name).is_dir():
                raise OutputError(f"{self.folder / name}: cannot be written (a folder of that name is in the way); "
                                  "remove it or choose another -o folder.")
        moved: List[Path] = []
        with _signals_held():
            try:
                self._write_lock(order + [Path(p).name for p in obsolete])
                for name in order:
                    os.replace(self.staging / name, self.folder / name)
                    moved.append(self.folder / name)
                for path in map(Path, obsolete):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                self._write_lock()
            except OSError as exc:
                for path in moved:  # half a set is worse than none
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise OutputError(f"{exc.filename or self.folder}: cannot be written ({exc.strerror or exc}).") \
                    from None
        return moved
