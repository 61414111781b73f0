"""Labelled cases to evaluate: case folders (image + *seg*/*label* [+ *mask*]), folders of them, CSV lists,
and the project's case list (``cases.csv``: only the rows of one use). Names are made unique and safe."""
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from synomaly.errors import InputError
from synomaly.files.volume_io import csv_row_files, file_role, image_stem, is_image_file


@dataclass
class EvalCase:
    """One labelled case: files only, read when evaluated so discovery stays cheap."""

    name: str
    image_path: Path
    label_path: Path
    mask_path: Optional[Path] = None


def _case_from_folder(folder: Path) -> EvalCase:
    roles: Dict[str, List[Path]] = {"image": [], "mask": [], "labels": []}
    for p in sorted(folder.iterdir()):
        if is_image_file(p):
            roles[file_role(p)].append(p)
    for role, files in roles.items():
        if len(files) > 1:
            raise InputError(f"{folder}: holds several {role} files ({', '.join(p.name for p in files)}); "
                             "put one image, one *seg*/*label* file and at most one *mask* file per case folder.")
    if not roles["image"]:
        raise InputError(f"{folder}: no image in the case folder (only masks or labels).")
    if not roles["labels"]:
        raise InputError(f"{folder}: no label file for {roles['image'][0].name}; evaluation needs the ground "
                         "truth as a file whose name contains 'seg', 'label' or 'lesion'.")
    mask = roles["mask"][0] if roles["mask"] else None
    return EvalCase(folder.name, roles["image"][0], roles["labels"][0], mask)


def _csv_rows(path: Path) -> List[Dict[str, str]]:
    """A CSV file's rows, column names lower-case, names and values stripped; unreadable is an InputError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as a CSV file ({getattr(exc, 'strerror', None) or exc}).") from None
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None} for row in rows]


def _cases_from_csv(path: Path) -> List[EvalCase]:
    """Rows ``image,label[,mask][,name]``; relative paths are relative to the CSV's folder."""
    rows = _csv_rows(path)
    if not rows:
        raise InputError(f"{path}: no rows; give a header 'image,label[,mask][,name]' and one row per case.")
    cases = []
    for number, row in enumerate(rows, start=2):
        if "image" not in row or "label" not in row:
            raise InputError(f"{path}: needs the columns 'image' and 'label' (optional 'mask', 'name'); "
                             f"found {', '.join(sorted(row)) or 'none'}.")
        if not any(row.values()):
            continue
        if not row["image"]:
            raise InputError(f"{path}, line {number}: no image.")
        if not row["label"]:
            raise InputError(f"{path}, line {number}: no label for {row['image']}; evaluation needs the ground truth.")
        files = csv_row_files(path, number, row, ("image", "label", "mask"))
        name = row.get("name") or image_stem(files["image"])
        cases.append(EvalCase(name, files["image"], files["label"], files.get("mask")))
    return cases


def cases_from_list(path, use: str = "development") -> List[EvalCase]:
    """The cases of a ``case,folder,use`` list (as ../shared/data/cases.csv) whose use is ``use``: each
    folder, relative to the list's, a case folder; named by the ``case`` column."""
    path = Path(path).expanduser()
    rows = _csv_rows(path)
    if not rows or any(column not in rows[0] for column in ("case", "folder", "use")):
        found = ", ".join(sorted(rows[0])) if rows else "no rows"
        raise InputError(f"{path}: a case list needs the columns case, folder and use ({found}); "
                         "for image,label lists pass the CSV as a case instead of --cases-csv.")
    chosen = [(number, row) for number, row in enumerate(rows, start=2) if row["use"] == use]
    if not chosen:
        uses = sorted({row["use"] for row in rows if row["use"]})
        raise InputError(f"{path}: no case with use '{use}' (uses in the list: {', '.join(uses) or 'none'}); "
                         "choose one with --use.")
    cases = []
    for number, row in chosen:
        folder = (path.parent / row["folder"]).resolve()
        if not folder.is_dir():
            raise InputError(f"{path}, line {number}: case {row['case']}: folder {folder} does not exist.")
        case = _case_from_folder(folder)
        cases.append(EvalCase(row["case"] or case.name, case.image_path, case.label_path, case.mask_path))
    return cases


def _safe_name(name: str) -> str:
    """A name usable in file names (``<case>_panel.png``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def unique_names(cases: List[EvalCase]) -> List[EvalCase]:
    """Panels are written per name, so equal names (``flair`` from a CSV) get the folder name, then a number."""
    seen: Dict[str, int] = {}
    names = [_safe_name(c.name) for c in cases]
    counts = {n: names.count(n) for n in names}
    out = []
    for case, name in zip(cases, names):
        if counts[name] > 1:
            name = _safe_name(f"{case.image_path.parent.name}_{name}")
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        out.append(EvalCase(name, case.image_path, case.label_path, case.mask_path))
    return out


def find_eval_cases(paths: Sequence) -> List[EvalCase]:
    """Cases from case folders, folders of case folders, or CSV files (``image,label[,mask][,name]``).

    A folder holding image files is one case (one image, one *seg*/*label* file, an optional *mask*
    file, named as ``synomaly.training.cases.find_cases`` names them); otherwise each subfolder holding
    image files is one. A case without a label is an InputError: there is nothing to evaluate.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    cases: List[EvalCase] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file() and path.suffix.lower() == ".csv":
            cases.extend(_cases_from_csv(path))
        elif path.is_dir():
            if any(is_image_file(p) for p in path.iterdir()):
                cases.append(_case_from_folder(path))
                continue
            subs = [p for p in sorted(path.iterdir()) if p.is_dir() and any(is_image_file(q) for q in p.iterdir())]
            if not subs:
                raise InputError(f"{path}: neither a case folder (image + label) nor a folder of case folders.")
            cases.extend(_case_from_folder(sub) for sub in subs)
        elif is_image_file(path):
            raise InputError(f"{path}: an image alone has no ground truth; give its case folder "
                             "(image + *seg*/*label* file) or a CSV with columns image,label.")
        else:
            raise InputError(f"{path}: no such case folder or CSV file.")
    if not cases:
        raise InputError("no evaluation cases found in " + ", ".join(str(p) for p in paths) + ".")
    return unique_names(cases)
