"""Training cases: image files (or a CSV list) found, paired with their masks and labels by name, and read.

A file whose name holds 'mask' is a foreground mask, one holding 'seg', 'label' or 'lesion' a lesion
label; beside several images, a mask or label belongs to the image named by the words before its role word."""
import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from synomaly.errors import InputError
from synomaly.files.geometry import Geometry, grid_difference
from synomaly.files.outputs import is_our_output
from synomaly.files.volume_io import (LABEL_WORDS, MASK_WORDS, csv_row_files, file_role, image_stem, is_image_file,
                                      read_volume)


@dataclass
class TrainingCase:
    """One healthy (or partly healthy) volume: slices with any label voxel are left out. ``group``: the
    acquisition or patient of a 2D image, held out for validation together (default: the image alone)."""

    name: str
    image: np.ndarray
    geometry: Geometry
    mask: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    group: Optional[str] = None


_WORD_BREAKS = re.compile(r"[\s_.-]+")
_ROLE_WORDS = {"mask": MASK_WORDS, "labels": LABEL_WORDS}
_ROLE_NAMES = {"mask": "mask", "labels": "label"}
CSV_COLUMNS = ("image", "mask", "label", "name", "group")
PAIRING_EXAMPLE = "pat1_flair.nii.gz with pat1_brainmask.nii.gz and pat1_seg.nii.gz"


def _words(path: Path) -> Tuple[str, ...]:
    return tuple(w for w in _WORD_BREAKS.split(image_stem(path).lower()) if w)


def _case_prefix(path: Path, role: str) -> Tuple[str, ...]:
    """The words before the one that names the role: ``pat1_brainmask`` -> ``(pat1,)``, ``seg`` -> ``()``."""
    words = _words(path)
    for i, word in enumerate(words):
        if any(r in word for r in _ROLE_WORDS[role]):
            return words[:i]
    return words


def pair_files(files: Sequence[Path], where: str) -> List[Tuple[Path, Optional[Path], Optional[Path]]]:
    """Group image files into (image, mask, labels) by name; ``where`` names the group in errors.

    The role comes from the name (``volume_io.file_role``). With one image, every partner belongs
    to it (the case-folder layout). With several, a partner belongs to the image whose name starts with
    the words before the partner's role word, compared word by word (``pat1_brainmask`` and
    ``pat1_seg`` belong to ``pat1_flair``, not to ``pat10_flair``). A partner that fits no image
    or several, and an image with two partners of one role, are refused.
    """
    images = [p for p in files if file_role(p) == "image"]
    found: Dict[Path, Dict[str, List[Path]]] = {image: {"mask": [], "labels": []} for image in images}
    for partner in (p for p in files if file_role(p) != "image"):
        role = file_role(partner)
        kind = _ROLE_NAMES[role]
        prefix = _case_prefix(partner, role)
        if len(images) == 1:
            fits = images
        elif not prefix and images:
            raise InputError(f"{where}: {partner.name} names no case, but there are several images "
                             f"({', '.join(p.name for p in images)}); name each {kind} after its image "
                             f"({PAIRING_EXAMPLE}) or put one image per case folder.")
        else:
            fits = [image for image in images if _words(image)[:len(prefix)] == prefix]
        if not fits:
            word = next(w for w in _ROLE_WORDS[role] if w in partner.name.lower())
            missing = f"name starts with '{'_'.join(prefix)}'" if images else "is given with it"
            raise InputError(f"{where}: {partner.name} is taken for a {kind} (its name holds '{word}'), but no "
                             f"image {missing}; give its image too, name the {kind} after its image "
                             f"({PAIRING_EXAMPLE}), or rename the file if it is an image.")
        if len(fits) > 1:
            raise InputError(f"{where}: {partner.name} fits several images ({', '.join(p.name for p in fits)}); "
                             f"name each {kind} after its whole image name (pat1_flair_seg.nii.gz) "
                             "or put one image per case folder.")
        found[fits[0]][role].append(partner)
    pairs = []
    for image in images:
        for role, partners in found[image].items():
            if len(partners) > 1:
                raise InputError(f"{where}: {image.name} has {len(partners)} {_ROLE_NAMES[role]} files "
                                 f"({', '.join(p.name for p in partners)}); keep one.")
        pairs.append((image, *(found[image][role][0] if found[image][role] else None for role in ("mask", "labels"))))
    return pairs


def read_case(name: str, image_path: Path, mask_path: Optional[Path], labels_path: Optional[Path],
               group: Optional[str] = None) -> TrainingCase:
    """One case from its files; a mask or label image must lie on the image's voxel grid (size, spacing,
    direction, origin), as detection checks its mask: one of another series or resampled would train on
    the wrong voxels."""
    image, geometry = read_volume(image_path)
    extras = {}
    for role, path in (("mask", mask_path), ("labels", labels_path)):
        if path is not None:
            arr, arr_geometry = read_volume(path)
            difference = grid_difference(arr.shape, arr_geometry, image.shape, geometry)
            if difference:
                kind = _ROLE_NAMES[role]
                raise InputError(f"{path}: the {kind} does not lie on {image_path.name}'s voxel grid ({difference}); "
                                 f"resample the {kind} onto the image.")
            extras[role] = arr > 0
    return TrainingCase(name, image, geometry, extras.get("mask"), extras.get("labels"), group)


def _image_files(folder: Path) -> List[Path]:
    """Image files of a folder; hidden ones (``._x.nii.gz`` from macOS, our own temporary files) and the outputs
    of a detection (anomaly maps, counterfactuals: not healthy scans) are not cases."""
    return [p for p in sorted(folder.iterdir())
            if is_image_file(p) and not p.name.startswith(".") and not is_our_output(p)]


def _cases_from_folder(folder: Path) -> List[TrainingCase]:
    """One image (+ partners): a case named after the folder. Several: a case per image, named after it."""
    pairs = pair_files(_image_files(folder), str(folder))
    if len(pairs) == 1:
        return [read_case(folder.name, *pairs[0])]
    return [read_case(image_stem(image), image, mask, labels) for image, mask, labels in pairs]


def _cases_from_csv(path: Path) -> List[TrainingCase]:
    """Rows ``image[,mask][,label][,name][,group]`` (``labels`` also names the label column); relative paths
    are relative to the CSV's folder. ``group``: see ``TrainingCase``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [(h or "").strip().lower() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as a CSV file ({exc}).") from None
    columns = ["label" if h == "labels" else h for h in header]
    unknown = [h for h in columns if h not in CSV_COLUMNS]
    if "image" not in columns or unknown:
        raise InputError(f"{path}: the header must name the columns image[,mask][,label][,name][,group]; found "
                         f"{', '.join(header) or 'none'}.")
    cases = []
    for number, row in enumerate(rows, start=2):
        values = {column: (row.get(original) or "").strip()
                  for column, original in zip(columns, reader.fieldnames)}
        if not any(values.values()):
            continue
        if not values["image"]:
            raise InputError(f"{path}, line {number}: no image.")
        files = csv_row_files(path, number, values, ("image", "mask", "label"))
        cases.append(read_case(values.get("name") or image_stem(files["image"]), files["image"], files.get("mask"),
                                files.get("label"), values.get("group") or None))
    return cases


def find_cases(paths: Sequence) -> List[TrainingCase]:
    """Healthy training cases from every documented layout; TrainingCase objects pass through.

    - a folder of image files (each image a case) or a case folder (one image), with optional mask
      and label partners paired by name (``pair_files``);
    - a folder of such folders (one level down);
    - image files listed one by one (partners listed with them are paired, per folder, the same way);
    - a CSV file with a header ``image[,mask][,label][,name][,group]``, paths relative to its folder.
    Labelled slices are left out of training, so partly healthy (lesion) cases may be used.
    """
    if isinstance(paths, (str, Path, TrainingCase)):
        paths = [paths]
    cases: List[TrainingCase] = []
    listed: Dict[Path, List[Path]] = {}
    for raw in paths:
        if isinstance(raw, TrainingCase):
            cases.append(raw)
            continue
        path = Path(raw).expanduser()
        if path.is_file() and path.suffix.lower() == ".csv":
            cases.extend(_cases_from_csv(path))
        elif is_image_file(path):
            listed.setdefault(path.parent, []).append(path)
        elif path.is_dir():
            if _image_files(path):
                cases.extend(_cases_from_folder(path))
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if _image_files(sub):
                    cases.extend(_cases_from_folder(sub))
        elif not path.exists():
            raise InputError(f"{path}: no such file or folder.")
        else:
            raise InputError(f"{path}: not an image file, folder or CSV list.")
    for folder, files in listed.items():
        pairs = pair_files(list(dict.fromkeys(files)), "listed files in " + str(folder))
        cases.extend(read_case(image_stem(image), image, mask, labels) for image, mask, labels in pairs)
    if not cases:
        raise InputError("no training volumes found in " + ", ".join(str(p) for p in paths) + "; give image "
                         "files, folders of them, folders of case folders or a CSV list.")
    return cases
