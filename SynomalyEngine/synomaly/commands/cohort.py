"""Detection over a cohort: which volumes, which share of them one process takes, and one summary.

Inputs (``find_inputs``). Each INPUT of ``synomaly detect`` is
  - an image file (NIfTI, NRRD, MHA, ...): one volume;
  - a folder holding DICOM files and no image files: one DICOM series (of several, the one --series names);
  - any other folder: a cohort. Every image file in it or in a folder below it is a volume, and every
    folder below it that holds DICOM files (and no image files) is a series (each of its series one
    input, NAME_seriesN, where it holds several: ``_each_series``). A file whose name holds
    'mask' is the mask of the image it is named after (pat1_brainmask goes with pat1_flair, as in
    training); lesion labels (*seg*, *label*, *lesion*), hidden files and folders and this run's own
    outputs are not inputs. A folder in which none of these is found is tried as a DICOM series;
  - a glob pattern, quoted so that the shell leaves it alone ('scans/*/flair.nii.gz', 'scans/**/*.nii.gz'):
    every image file and folder it matches, as above, masks paired the same way;
  - a CSV file with the header image[,mask][,name] (a label column is ignored, so evaluation's CSVs
    serve too); relative paths are relative to the CSV's folder.
A run given exactly one volume by name (an image file or a DICOM folder) and no ``--shard`` is a single
run: outputs that exist are refused unless --overwrite. Every other run is a cohort run: an input whose
report exists (the report is written last, so its presence marks a complete set) is skipped unless
--overwrite, so that a killed job can be submitted again as it was.

Order and shares. Inputs keep the order of the arguments; within a folder or glob they are sorted by
their path relative to it, character by character, and a CSV keeps its rows' order, so every machine
gets the same list whatever its mount point or directory listing order. ``take_shard(items, k, n)``
takes inputs k, k+n, k+2n, ... (k from 1 to n, the way Slurm's ``--array=1-N`` numbers tasks): every
input lands in exactly one of the n shares, and the shares differ in size by one at most.

Names. Outputs are named after their input (pat1_flair.nii.gz -> pat1_flair_*), or the CSV's name
column. Inputs that would share a name (two DICOM folders called T2) are named by their path below
their deepest common folder (patA_T2, patB_T2), the same on every machine.

Summary. Each process keeps the rows of its share in ``summary.shard-K-of-N.csv`` (a run without
--shard is shard 1 of 1), written atomically when it starts (every input 'pending') and after each input.
When the run ends (also when Ctrl-C or SIGTERM stops it) it rebuilds ``summary.csv`` and
``failures.csv`` from every shard file in the folder, under an exclusive lock file (``output_set``:
created with O_EXCL, so it works on POSIX, Windows and shared cluster file systems; a waiting process
polls). Whoever rebuilds last has seen every shard file written before its own, so two shards finishing
at the same moment both appear. Where several rows name one output (a share rerun with another N), the
latest attempt counts, a 'pending' row only when nothing else is known.

From Python: ``synomaly.commands.cli.main(["detect", folder, "-o", out, "--shard", "2/8"])`` runs a share as the
command does; ``find_inputs``, ``take_shard`` and ``merge_summary`` are the pieces, for a loop of one's own
around ``synomaly.inference.detection.detect``.
"""
import contextlib
import csv
import glob
import io
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from synomaly.errors import InputError, OutputError
from synomaly.files.output_set import OutputSet
from synomaly.files.outputs import is_our_output
from synomaly.files.volume_io import atomic_write_bytes, image_stem, is_image_file

log = logging.getLogger(__name__)

# ``series``: the Series Instance UID of a DICOM input taken from a folder of several (its input is the folder).
SUMMARY_COLUMNS = ("name", "input", "series", "mask", "status", "anomalous_volume_ml", "n_components", "max_score",
                   "threshold", "model_id", "seconds", "finished", "shard", "error")
FAILURE_COLUMNS = ("name", "input", "series", "mask", "error", "finished", "shard")
SHARD_FILE = re.compile(r"^summary\.shard-(\d+)-of-(\d+)\.csv$")
CSV_COLUMNS = ("image", "mask", "name", "label", "labels")
OUTPUT_SUFFIXES = ("_anomaly_seg", "_anomaly_map", "_counterfactual", "_uncertainty", "_overview")
MERGE_WAIT_S = 300.0  # rebuilding takes well under a second; many shards may finish together
INTERRUPTED_MERGE_WAIT_S = 10.0  # after SIGTERM a scheduler waits ~30 s before it kills
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class CohortInput:
    """One volume to detect in: its file or DICOM folder, optional mask, and the name of its outputs."""
    path: Path
    mask: Optional[Path] = None
    name: str = ""
    series: Optional[str] = None  # the Series Instance UID, where a DICOM folder holds several


@dataclass
class FoundInputs:
    items: List[CohortInput]
    cohort: bool  # False: exactly one volume named on its own (a single run)
    lists: List[Path] = field(default_factory=list)  # the CSV lists that named inputs: inputs too, never outputs


# --- shares -----------------------------------------------------------------------------------------

def parse_shard(text: str) -> Tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N."""
    match = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", str(text))
    if not match:
        raise InputError(f"--shard {text}: give K/N, the K-th of N shares (for a Slurm array "
                         "--array=1-N: --shard $SLURM_ARRAY_TASK_ID/N).")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1:
        raise InputError(f"--shard {text}: the number of shares must be at least 1.")
    if not 1 <= k <= n:
        raise InputError(f"--shard {text}: shares are numbered 1 to {n}; with a Slurm array numbered from 0 "
                         f"(--array=0-{n - 1}) give --shard $((SLURM_ARRAY_TASK_ID + 1))/{n}.")
    return k, n


def take_shard(items: Sequence, k: int, n: int) -> list:
    """Items k, k+n, k+2n, ... (1-based): the n shares cover every item exactly once."""
    if not 1 <= k <= n:
        raise ValueError(f"share {k} of {n} does not exist")
    return list(items[k - 1::n])


# --- finding the inputs -----------------------------------------------------------------------------

def _holds_dicom(files: Iterable[Path]) -> bool:
    """A ``.dcm`` file or one with the DICOM preamble ('DICM' at byte 128); DICOMDIR indexes, not images."""
    for path in files:
        if path.name.upper() == "DICOMDIR" or not path.is_file():
            continue
        if path.name.lower().endswith(".dcm"):
            return True
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                f.seek(128)
                if f.read(4) == b"DICM":
                    return True
    return False


def _listing(folder: Path) -> List[Path]:
    try:
        return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as exc:
        raise InputError(f"{folder}: cannot be listed ({exc.strerror or exc}).") from None


def _is_output(path: Path, output: Optional[Path]) -> bool:
    """Our own outputs are never inputs: any file of a set whose report of ours names it, and in the output
    folder anything named like an output."""
    return is_our_output(path) or (_real(path.parent) == output and image_stem(path).endswith(OUTPUT_SUFFIXES))


def _pair(images: List[Path], where: str) -> List[Tuple[Path, Optional[Path]]]:
    """Images with their masks (labels dropped), paired by name as training pairs them."""
    from synomaly.training.cases import pair_files

    return [(image, mask) for image, mask, _ in pair_files(images, where)]


def _walk(root: Path, output: Optional[Path]) -> List[Tuple[str, Path, Optional[Path]]]:
    """(key, volume, mask) for every volume in and below ``root``; key: the path relative to ``root``."""
    found: List[Tuple[str, Path, Optional[Path]]] = []
    seen = set()

    def visit(folder: Path) -> None:
        real = _real(folder)
        if real in seen:  # a symbolic link back up the tree
            return
        seen.add(real)
        entries = _listing(folder)
        images = [p for p in entries if is_image_file(p) and not _is_output(p, output)]
        if images:
            found.extend((image.relative_to(root).as_posix(), image, mask)
                         for image, mask in _pair(images, str(folder)))
        elif _holds_dicom([p for p in entries if not _is_output(p, output)]):  # our SEG files are no series
            found.append((folder.relative_to(root).as_posix(), folder, None))
            return
        for sub in entries:
            if sub.is_dir():
                visit(sub)

    visit(root)
    return sorted(found, key=lambda f: f[0])


def _from_glob(pattern: str, output: Optional[Path]) -> List[Tuple[str, Path, Optional[Path]]]:
    matches = sorted(glob.glob(pattern, recursive=True))
    found: List[Tuple[str, Path, Optional[Path]]] = []
    files: Dict[Path, List[Path]] = {}
    for match in map(Path, matches):
        if match.is_dir():
            walked = _walk(match, output)
            found.extend((f"{match.as_posix()}/{key}", path, mask) for key, path, mask in walked)
            if not walked:
                found.append((match.as_posix(), match, None))
        elif is_image_file(match) and not _is_output(match, output):
            files.setdefault(match.parent, []).append(match)
    for folder, images in files.items():
        found.extend((image.as_posix(), image, mask) for image, mask in _pair(images, f"files matching {pattern}"))
    if not found:
        raise InputError(f"{pattern}: no image file or folder matches this pattern.")
    return sorted(found, key=lambda f: f[0])


def _check_name(name: str, where: str) -> str:
    if not name or name.startswith(".") or any(c in name for c in "/\\:"):
        raise InputError(f"{where}: name {name!r} cannot name output files; give one without /, \\, : "
                         "or a leading dot.")
    return name


def _from_csv(path: Path) -> List[CohortInput]:
    """Rows ``image[,mask][,name]``; a label column is allowed and ignored. Files are not opened here:
    a missing one fails its own row, not the batch."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as a CSV file ({exc}).") from None
    columns = [(h or "").strip().lower() for h in fields]
    if "image" not in columns or any(c not in CSV_COLUMNS for c in columns):
        raise InputError(f"{path}: the header must name the columns image[,mask][,name] (a label column is "
                         f"ignored); found {', '.join(fields) or 'none'}.")
    items = []
    for number, row in enumerate(rows, start=2):
        values = {column: (row.get(original) or "").strip() for column, original in zip(columns, fields)}
        if not any(values.values()):
            continue
        if not values["image"]:
            raise InputError(f"{path}, line {number}: no image.")
        files = []
        for column in ("image", "mask"):
            value = values.get(column)
            p = Path(value).expanduser() if value else None
            files.append(p if p is None or p.is_absolute() else path.parent / p)
        name = _check_name(values["name"], f"{path}, line {number}") if values.get("name") else ""
        items.append(CohortInput(files[0], files[1], name))
    if not items:
        raise InputError(f"{path}: no rows; give a header 'image[,mask][,name]' and one row per volume.")
    return items


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


def _real(path: Path) -> Path:
    """The absolute path with links followed; a link that loops stays as it is (``Path.resolve`` raises there),
    and reading it then says that it cannot be read."""
    return Path(os.path.realpath(_absolute(Path(path))))


def _name(items: List[CohortInput]) -> List[CohortInput]:
    """Give every unnamed input the name of its outputs; refuse two inputs writing the same files."""
    from synomaly.files.outputs import case_name

    names = [item.name or case_name(item.path) for item in items]
    counts = Counter(n.casefold() for n in names)  # Windows and macOS folders ignore case
    clashing = [i for i, item in enumerate(items) if not item.name and counts[names[i].casefold()] > 1]
    by_name: Dict[str, List[int]] = {}
    for i in clashing:
        by_name.setdefault(names[i].casefold(), []).append(i)
    for group in by_name.values():
        paths = [_absolute(items[i].path) for i in group]
        common = Path(*_common_parts([p.parent.parts for p in paths]))
        for i, p in zip(group, paths):
            parts = p.relative_to(common).parts
            names[i] = "_".join(parts[:-1] + (case_name(p),))
    final = [n.casefold() for n in names]
    for i, name in enumerate(final):
        j = final.index(name)
        if j != i:
            raise InputError(f"{items[j].path} and {items[i].path} would both write {names[i]}_* outputs; "
                             "name them in a CSV (name column) or run them into different -o folders.")
    return [replace(item, name=name) for item, name in zip(items, names)]


def _common_parts(parts: List[Tuple[str, ...]]) -> Tuple[str, ...]:
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common


def find_inputs(arguments, masks: Optional[Sequence] = None, output=None) -> FoundInputs:
    """The volumes named by ``synomaly detect``'s INPUT arguments (see the module's docstring), in
    their shard order, named, without duplicates. ``masks``: one per argument, only when every argument
    names one volume. ``output``: the output folder, whose own outputs are never inputs."""
    if isinstance(arguments, (str, Path)):
        arguments = [arguments]
    arguments = [str(a) for a in arguments]
    if not arguments:
        raise InputError("no input given; give image files, DICOM folders, folders of them, a glob or a CSV list.")
    out = _real(Path(output).expanduser()) if output is not None else None
    items: List[CohortInput] = []
    lists: List[Path] = []
    named_alone = True
    for raw in arguments:
        path = Path(raw).expanduser()
        walked = _walk(path, out) if path.is_dir() else []
        if path.is_file() and path.suffix.lower() == ".csv":
            items.extend(_from_csv(path))
            lists.append(path)
            named_alone = False
        elif walked and [p for _, p, _ in walked] != [path]:  # not the folder itself as a DICOM series
            items.extend(CohortInput(p, m) for _, p, m in walked)
            named_alone = False
        elif not path.exists() and _GLOB_CHARS & set(raw):
            items.extend(CohortInput(p, m) for _, p, m in _from_glob(raw, out))
            named_alone = False
        else:  # a volume by name: reading it says what may be wrong with it
            items.append(CohortInput(path))
    if masks:
        if not named_alone:
            raise InputError("--mask goes with inputs named one by one; for a folder, glob or CSV, name each mask "
                             "after its image (pat1_brainmask beside pat1_flair) or use a CSV mask column.")
        if len(masks) != len(items):
            raise InputError(f"{len(items)} inputs but {len(masks)} masks; give one --mask per input, or none.")
        items = [replace(item, mask=Path(m)) for item, m in zip(items, masks)]
    unique: Dict[Path, CohortInput] = {}
    for item in items:
        unique.setdefault(_real(item.path), item)
    items = _name(list(unique.values()))
    cohort = len(arguments) > 1 or not named_alone
    return FoundInputs(_each_series(items) if cohort else items, cohort=cohort, lists=lists)


def _each_series(items: List[CohortInput]) -> List[CohortInput]:
    """In a cohort, each series of a DICOM folder of several is one input, named after its folder and its
    Series Number (its UID where numbers repeat); a folder given alone is refused with the list instead."""
    from synomaly.files.dicom_series import list_series

    expanded: List[CohortInput] = []
    for item in items:
        listed = list_series(item.path) if Path(item.path).is_dir() else []
        if len(listed) < 2:
            expanded.append(item)
            continue
        numbers = [what.split()[1] if what.startswith("series ") else "" for _, what, _ in listed]
        unique = all(numbers) and len(set(numbers)) == len(numbers)
        expanded.extend(replace(item, series=uid, name=f"{item.name}_series{number}" if unique else
                                f"{item.name}_{uid}") for (uid, _, _), number in zip(listed, numbers))
    return expanded


# --- the summary ------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _number(value, digits: int = 6) -> str:
    return "" if value is None else f"{float(value):.{digits}g}"


# A cell that starts so is a formula to a spreadsheet (=1+1, +cmd|...): written with a leading quote, as
# OWASP advises, which spreadsheets show as text; read back without it.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TEXT_COLUMNS = ("name", "input", "mask", "error")


def _as_text(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def _from_text(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_STARTS) else value


def _csv_bytes(rows: Iterable[Dict[str, str]], columns: Sequence[str]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _as_text(v) if k in TEXT_COLUMNS else v for k, v in row.items()} for row in rows)
    return text.getvalue().encode("utf-8")


def summary_files(folder: Path, shard: Tuple[int, int]) -> Dict[str, Path]:
    """The files a cohort run writes beside the outputs: this share's summary, the summary and the failures."""
    return {"shard": Path(folder) / f"summary.shard-{shard[0]}-of-{shard[1]}.csv",
            "summary": Path(folder) / "summary.csv", "failures": Path(folder) / "failures.csv"}


def _ours(path: Path) -> bool:
    """A summary file of ours: a header that names each input and uses only our columns (an older engine's
    files had fewer of them)."""
    columns = FAILURE_COLUMNS if path.name == "failures.csv" else SUMMARY_COLUMNS
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return bool(header) and "name" in header and set(header) <= set(columns)


def check_summary_files(folder: Path, shard: Tuple[int, int]) -> None:
    """Before any work: the summary files a cohort run replaces are ours, or absent (a study folder may hold a
    summary.csv of the user's own)."""
    for path in summary_files(folder, shard).values():
        if path.exists() and not _ours(path):
            raise OutputError(f"{path} exists and was not written by synomaly (its columns are not a summary's); "
                              "synomaly replaces only its own files: move it, or choose another -o folder.")


def _read_rows(path: Path) -> List[Dict[str, str]]:
    """A shard file's rows; one that cannot be read is left out, with a warning."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        log.warning(f"{path}: cannot be read ({exc}); its rows are left out of the summary.")
        return []
    return [{c: _from_text(row.get(c) or "") for c in SUMMARY_COLUMNS} for row in rows if row.get("name")]


class CohortLog:
    """This process's share of the summary: ``summary.shard-K-of-N.csv``, held under a lock while the run
    lasts (a second run of the same share into the same folder is refused), rewritten after every input."""

    def __init__(self, folder, items: Sequence[CohortInput], shard: Tuple[int, int] = (1, 1)):
        self.folder = Path(folder)
        self.items = list(items)
        self.shard = f"{shard[0]}/{shard[1]}"
        self.path = self.folder / f"summary.shard-{shard[0]}-of-{shard[1]}.csv"
        self.rows: Dict[str, Dict[str, str]] = {}
        self.counts: Counter = Counter()
        self._lock = OutputSet(self.folder, self.path.name)

    def __enter__(self) -> "CohortLog":
        self._lock.acquire()
        try:
            self.rows = {row["name"]: row for row in _read_rows(self.path)}
            for item in self.items:
                if item.name not in self.rows:
                    self._record(item, "pending", finished=_now())
            self.write()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                self.write()
                try:
                    merge_summary(self.folder, wait_s=INTERRUPTED_MERGE_WAIT_S)
                except OutputError as error:
                    log.warning(str(error))
        finally:
            self._lock.release()

    def _record(self, item: CohortInput, status: str, report: Optional[dict] = None, error: str = "",
                finished: str = "") -> None:
        report = report or {}
        self.rows[item.name] = {
            "name": item.name, "input": str(_real(item.path)), "series": item.series or "",
            "mask": str(_real(item.mask)) if item.mask is not None else "", "status": status,
            "anomalous_volume_ml": _number(report.get("anomalous_volume_ml")),
            "n_components": str(report.get("n_components", "")),
            "max_score": _number(report.get("max_score")), "threshold": _number(report.get("threshold")),
            "model_id": str((report.get("model") or {}).get("model_id", "")),
            "seconds": f"{sum((report.get('timings_s') or {}).values()):.1f}" if report.get("timings_s") else "",
            "finished": finished or _now(), "shard": self.shard, "error": error}

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: (r["input"], r["name"]))
        atomic_write_bytes(self.path, _csv_bytes(rows, SUMMARY_COLUMNS))

    def done(self, item: CohortInput, report: dict) -> None:
        """Detected now; ``report`` is the one written beside the outputs."""
        self._record(item, "done", report)
        self.counts["done"] += 1
        self.write()

    def existing(self, item: CohortInput, report_path: Path) -> bool:
        """Outputs from an earlier run: their report fills the row. False if the report cannot be read."""
        try:
            report = json.loads(Path(report_path).read_text(encoding="utf-8"))
            finished = datetime.fromtimestamp(Path(report_path).stat().st_mtime, timezone.utc)
        except (OSError, ValueError):
            return False
        self._record(item, "done", report, finished=finished.isoformat(timespec="seconds"))
        self.counts["skipped"] += 1
        self.write()
        return True

    def failed(self, item: CohortInput, error: str) -> None:
        self._record(item, "failed", error=error)
        self.counts["failed"] += 1
        self.write()


def _acquire_waiting(lock: OutputSet, wait_s: float) -> None:
    """Take the lock, polling while another live process holds it, for at most ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            return
        except OutputError as exc:  # held by a live run (OutputSet._refuse says so), or unwritable: give up
            if "another synomaly run" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0.05, 0.3))  # spread out processes that wait together


def merge_summary(folder, wait_s: float = MERGE_WAIT_S) -> Dict[str, int]:
    """Rebuild ``summary.csv`` and ``failures.csv`` from every ``summary.shard-*-of-*.csv`` in ``folder``,
    under the folder's summary lock. Returns the number of inputs by status."""
    folder = Path(folder)
    lock = OutputSet(folder, "summary.csv")
    try:
        _acquire_waiting(lock, wait_s)
    except OutputError as exc:
        raise OutputError(f"{folder / 'summary.csv'} was not rebuilt ({exc}); every finished input is listed in "
                          "the summary.shard-*.csv files, and running any shard again (finished inputs are "
                          "skipped) rebuilds it.") from None
    try:
        best: Dict[str, Dict[str, str]] = {}
        for path in sorted(p for p in folder.iterdir() if SHARD_FILE.match(p.name) and _ours(p)):
            for row in _read_rows(path):
                rank = (row["status"] != "pending", row["finished"])
                known = best.get(row["name"])
                if known is None or rank > (known["status"] != "pending", known["finished"]):
                    best[row["name"]] = row
        rows = sorted(best.values(), key=lambda r: (r["input"], r["name"]))
        atomic_write_bytes(lock.stage(folder / "failures.csv"),
                           _csv_bytes((r for r in rows if r["status"] == "failed"), FAILURE_COLUMNS))
        atomic_write_bytes(lock.stage(folder / "summary.csv"), _csv_bytes(rows, SUMMARY_COLUMNS))
        lock.commit(last=[folder / "summary.csv"])
    finally:
        lock.release()
    return dict(Counter(r["status"] for r in rows))


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's time limit, scancel) stops the run as Ctrl-C does: the input in progress
    leaves nothing and the summary is rebuilt. A second SIGTERM acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
