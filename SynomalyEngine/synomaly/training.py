"""Training on healthy volumes: slice extraction, the denoising loop, checkpoints and calibration.

A run keeps its state in ``<model>.run/`` beside the model file: ``checkpoint.pt`` (written
atomically every ``checkpoint_every`` steps and when ``cancel()`` says stop, so a stopped run resumes
at its step and a killed one at the last saved step), ``loss.csv`` and ``previews/``. Every setting
is checked before any data are read (``TrainingSettings.validate``). The finished model is calibrated
on held-out healthy slices. Under torchrun the processes share every batch (``distributed``).

2D images (volumes of one slice) train a 2D preset's model (carotid-us); each image is one slice. Their
validation images are whole groups (the CSV's ``group`` column: one acquisition or patient), so that
calibration never sees a neighbouring frame of a training image.
"""
import csv
import io
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import Cancelled, InputError, OutputError
from .volume_io import (LABEL_WORDS, MASK_WORDS, Geometry, csv_row_files, file_role, image_stem, is_2d,
                        is_image_file, last_line, read_volume)


@dataclass
class TrainingSettings:
    preset: str = "brain-flair"
    noise: str = "synomaly"
    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    max_timestep: int = 500
    loss: str = "l2"  # "l2", "l1" or "hybrid" (L2 + VLB term)
    schedule: str = "cosine"
    num_steps: int = 1000
    image_size: int = 128
    base_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (16, 8)
    flips: str = "h"  # "h", "hv" or "none"
    intensity_augment: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    preview_every: int = 500
    min_slice_foreground: float = 0.05
    # "skip": slices with any labelled lesion voxel are left out. "mask": they are used, with the lesion
    # grown by lesion_margin_mm left out of the loss and of where synthetic anomalies are placed: far
    # more healthy tissue at the levels where lesions occur.
    lesion_slices: str = "skip"
    lesion_margin_mm: float = 5.0
    precision: str = "auto"  # "auto": runtime.resolve_training_precision (fp32 but where bf16 measured faster)
    # torch.compile the training step's network (fused elementwise work): on an H100 the bf16 step of the
    # default network ran 1.75x faster after about a minute of compiling; no gain measured on a CPU.
    compile: bool = False
    validation_fraction: float = 0.15
    target_fpr: float = 0.01
    device: str = "auto"
    seed: int = 0
    name: str = ""
    description: str = ""
    inference: Dict = field(default_factory=dict)
    # 2.5D: the network also sees this many neighbouring slices each side, as channels (0: 2D).
    context_slices: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    def network_config(self):
        from .network import UNetConfig

        return UNetConfig(in_channels=1 + 2 * self.context_slices, out_channels=1, base_channels=self.base_channels,
                          channel_mult=tuple(self.channel_mult), num_res_blocks=self.num_res_blocks,
                          attention_resolutions=tuple(self.attention_resolutions), image_size=self.image_size)

    def validate(self) -> None:
        """Refuse, with one line naming it, any setting a run would fail on (or silently waste time on).

        Called at the start of ``train`` before data are read or anything is written, so the command
        line, the Slicer module and the Python API share the same checks. The checks that need torch
        (noise kinds, the network) come last, so that most refusals are instant."""
        from .presets import PRESETS

        choices = {"preset": tuple(PRESETS), "loss": ("l2", "l1", "hybrid"), "schedule": ("cosine", "linear"),
                   "flips": ("h", "v", "hv", "none"), "lesion_slices": ("skip", "mask"),
                   "precision": ("auto", "fp32", "bf16")}
        for key, allowed in choices.items():
            _check_choice(getattr(self, key), key, allowed)
        for key, minimum in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("preview_every", 1),
                             ("num_steps", 2), ("max_timestep", 1), ("num_res_blocks", 1), ("base_channels", 1),
                             ("image_size", 1), ("seed", 0), ("context_slices", 0)):
            _check_whole(getattr(self, key), _LABELS.get(key, key.replace("_", " ")), minimum)
        if not isinstance(self.compile, bool):
            raise InputError(f"compile must be True or False, got {self.compile!r}.")
        if self.context_slices > 0 and PRESETS[self.preset].two_d:
            raise InputError(f"context slices need volumes: the {self.preset} preset works on 2D images, which have "
                             "no neighbouring slices; leave context slices at 0.")
        if self.max_timestep > self.num_steps:
            raise InputError(f"max timestep {self.max_timestep} exceeds the schedule's {self.num_steps} steps.")
        if self.seed >= 2 ** 63:
            raise InputError(f"seed must be below 2**63, got {self.seed}.")
        _check_number(self.lr, "learning rate", 0.0, math.inf)
        _check_number(self.target_fpr, "target false-positive rate", 0.0, 1.0)
        _check_number(self.weight_decay, "weight decay", 0.0, math.inf, low_included=True)
        _check_number(self.grad_clip, "gradient clipping norm", 0.0, math.inf)
        _check_number(self.ema_decay, "EMA decay", 0.0, 1.0, low_included=True)
        _check_number(self.intensity_augment, "intensity augmentation", 0.0, 1.0, low_included=True)
        _check_number(self.min_slice_foreground, "minimum slice foreground", 0.0, 1.0, low_included=True)
        _check_number(self.validation_fraction, "validation fraction", 0.0, 1.0, low_included=True)
        _check_number(self.lesion_margin_mm, "lesion margin (mm)", 0.0, math.inf, low_included=True)
        if not isinstance(self.inference, dict):
            raise InputError(f"inference settings must be a dict, got {type(self.inference).__name__}.")
        from .network import config_problem
        from .noise import NOISE_FUNCTIONS

        _check_choice(self.noise, "noise", tuple(sorted(NOISE_FUNCTIONS)))
        problem = config_problem(self.network_config())
        if problem:
            raise InputError(problem)


_LABELS = {"lr": "learning rate", "checkpoint_every": "checkpoint interval", "preview_every": "preview interval",
           "num_steps": "number of diffusion steps", "num_res_blocks": "residual blocks per level",
           "context_slices": "context slices"}


def _check_choice(value, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def _check_whole(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")


def _check_number(value, name: str, low: float, high: float, low_included: bool = False) -> None:
    """A finite number in (low, high), or [low, high) with ``low_included``; ``high`` is never included."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value) and (low <= value if low_included else low < value) and value < high
    if not ok:
        if math.isinf(high):
            wanted = f"a finite number {'of at least' if low_included else 'above'} {low:g}"
        elif low_included:
            wanted = f"a number from {low:g} to below {high:g}"
        else:
            wanted = f"a number between {low:g} and {high:g}, both excluded"
        raise InputError(f"{name} must be {wanted}, got {value!r}.")


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
    """One case from its files; a mask or label image must have the image's size."""
    image, geometry = read_volume(image_path)
    extras = {}
    for role, path in (("mask", mask_path), ("labels", labels_path)):
        if path is not None:
            arr, _ = read_volume(path)
            if arr.shape != image.shape:
                raise InputError(f"{path}: size {tuple(reversed(arr.shape))} differs from {image_path.name}'s "
                                 f"{tuple(reversed(image.shape))}.")
            extras[role] = arr > 0
    return TrainingCase(name, image, geometry, extras.get("mask"), extras.get("labels"), group)


def _image_files(folder: Path) -> List[Path]:
    """Image files of a folder; hidden ones (``._x.nii.gz`` from macOS, our own temporary files) are not cases."""
    return [p for p in sorted(folder.iterdir()) if is_image_file(p) and not p.name.startswith(".")]


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


@dataclass
class SliceSet:
    images: "object"  # torch tensor (N, 1, S, S)
    masks: "object"   # torch tensor (N, 1, S, S) bool
    keep: "object"    # torch tensor (N, 1, S, S) bool: pixels the loss counts (outside grown lesions), or None
    validation: Dict[int, List[int]]  # case index -> reoriented axial indices held out
    summary: Dict


def _held_out_groups(cases: Sequence[TrainingCase], fraction: float, rng) -> set:
    """Groups of 2D images held out for validation: that fraction of them, at least one of two or more."""
    groups = sorted({case.group or case.name for case in cases if is_2d(case.image.shape)})
    n_val = int(round(len(groups) * fraction))
    if len(groups) > 1 and fraction > 0:
        n_val = min(max(n_val, 1), len(groups) - 1)
    return set(rng.choice(groups, size=n_val, replace=False).tolist()) if n_val else set()


def grown_lesion(labels: np.ndarray, margin_mm: float, spacing) -> np.ndarray:
    """Labelled voxels and every voxel within ``margin_mm`` of one (the spacing's millimetres)."""
    from scipy import ndimage

    lesion = labels > 0
    if margin_mm <= 0 or not lesion.any():
        return lesion
    return ndimage.distance_transform_edt(~lesion, sampling=spacing) <= margin_mm


def extract_slices(cases: Sequence[TrainingCase], settings: TrainingSettings, preprocess) -> SliceSet:
    """Healthy axial slices of every case, split by blocks of 8 slices into training and validation;
    2D images (one slice each) by whole groups (``TrainingCase.group``). With ``lesion_slices="mask"``
    the lesion slices train too (their grown lesion masked out); validation keeps lesion-free slices only."""
    import torch

    from .preprocessing import prepare_volume
    from .presets import get_preset, two_d_refusal

    preset = get_preset(settings.preset)
    for case in cases:
        if is_2d(case.image.shape) and not preset.two_d:
            raise InputError(two_d_refusal(preset.name, f"training case {case.name}",
                                           [n for n in reversed(case.image.shape) if n != 1]))
    rng = np.random.default_rng(settings.seed)
    held_groups = _held_out_groups(cases, settings.validation_fraction, rng)
    # Per case: prepared volume, lesion-free slices, held-out blocks, slices to train on, and (lesion
    # slices masked) the grown lesion with the indices of the slices that hold a labelled lesion.
    prepared_cases, healthy_slices, val_blocks, usable_slices, masked = [], [], [], [], []
    for case in cases:
        prepared = prepare_volume(case.image, case.geometry, preprocess, case.mask, what=f"training case {case.name}")
        fg = prepared.foreground
        area = fg.shape[1] * fg.shape[2]
        two_d = is_2d(case.image.shape)
        # A 2D image was chosen as it is: its one slice counts whatever share of it the organ covers.
        healthy = [z for z in prepared.slices if two_d or fg[z].sum() / area >= settings.min_slice_foreground]
        usable = list(healthy)
        lesion = prepared.orientation.apply(case.labels) if case.labels is not None else None
        if lesion is not None:
            healthy = [z for z in healthy if not lesion[z].any()]
        if settings.lesion_slices == "mask" and lesion is not None and lesion.any():
            masked.append((grown_lesion(lesion, settings.lesion_margin_mm, prepared.spacing_zyx),
                           set(np.where(lesion.any(axis=(1, 2)))[0].tolist())))
        else:
            usable = healthy
            masked.append(None)
        usable_slices.append(usable)
        blocks = sorted({z // 8 for z in healthy})
        n_val = int(round(len(blocks) * settings.validation_fraction))
        if two_d:
            chosen = set(blocks) if (case.group or case.name) in held_groups else set()
        else:
            chosen = set(rng.choice(blocks, size=n_val, replace=False).tolist()) if n_val and len(blocks) > 1 else set()
        prepared_cases.append(prepared)
        healthy_slices.append(healthy)
        val_blocks.append(chosen)
    if not any(val_blocks):
        # Small volumes (few blocks each): hold out one block of the case with the most, so calibration
        # always has held-out data.
        ci = int(np.argmax([len({z // 8 for z in h}) for h in healthy_slices]))
        blocks = sorted({z // 8 for z in healthy_slices[ci]})
        if len(blocks) > 1:
            val_blocks[ci] = {int(rng.choice(blocks))}
    masking = any(m is not None for m in masked)
    images, masks, keeps, validation, per_case = [], [], [], {}, []
    for ci, (case, prepared, healthy, chosen) in enumerate(zip(cases, prepared_cases, healthy_slices, val_blocks)):
        val = [z for z in healthy if z // 8 in chosen]
        train = [z for z in usable_slices[ci] if z // 8 not in chosen]
        lesion_slices = 0
        if train:
            im, m = prepared.network_slices(train)
            images.append(im)
            masks.append(m)
            if masked[ci] is not None:
                grown, lesion_z = masked[ci]
                inside = prepared.frame.to_network(grown[train].astype(np.float32), fill=0.0, mode="nearest")
                keeps.append(inside <= 0.5)
                lesion_slices = len(lesion_z & set(train))
            elif masking:
                keeps.append(torch.ones_like(m))
        validation[ci] = val
        per_case.append({"case": case.name, "train_slices": len(train), "validation_slices": len(val),
                         "lesion_slices": lesion_slices})
    if not images:
        raise InputError("no healthy slices with enough foreground in the training data.")
    if not any(validation.values()) and all(is_2d(c.image.shape) for c in cases):
        # Said now, not after the whole run, when calibration would find nothing to calibrate on.
        raise InputError(f"the {len(cases)} training images are all of one group (acquisition or patient), and "
                         "calibration needs images of another, held out; give images of two or more groups "
                         "(the group column of a training CSV).")
    imgs = torch.cat(images)
    summary = {"cases": per_case, "train_slices": int(imgs.shape[0]),
               "validation_slices": int(sum(len(v) for v in validation.values())),
               "lesion_slices": int(sum(c["lesion_slices"] for c in per_case))}
    keep = torch.cat(keeps) if masking else None
    return SliceSet(imgs, torch.cat(masks), keep, validation, summary)


def augment(x, m, settings: TrainingSettings, generator, keep=None):
    """Random flips (the same for image, mask and ``keep``) and a mild gamma / contrast change inside the mask."""
    import torch

    b = x.shape[0]
    for axis, letter in ((-1, "h"), (-2, "v")):
        if letter in settings.flips:
            f = torch.rand(b, generator=generator) < 0.5
            x[f], m[f] = x[f].flip(axis), m[f].flip(axis)
            if keep is not None:
                keep[f] = keep[f].flip(axis)
    a = settings.intensity_augment
    if a > 0:
        gamma = torch.exp((torch.rand(b, generator=generator) * 2 - 1) * a).view(-1, 1, 1, 1)
        gain = (1 + (torch.rand(b, generator=generator) * 2 - 1) * a / 2).view(-1, 1, 1, 1)
        y = (((x + 1) / 2).clamp(0, 1) ** gamma * gain * 2 - 1).clamp(-1, 1)
        x = torch.where(m, y, x)
    return x, m, keep


def _save_atomic_torch(obj, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_preview(path: Path, network, schedule, images, device) -> None:
    """Input | noised (t = 200) | one-step counterfactual, one row per validation slice."""
    import torch
    from PIL import Image

    from .multistage import middle
    from .volume_io import atomic_write_bytes

    with torch.no_grad():
        x = images.to(device)
        t = torch.full((x.shape[0],), 200, device=device, dtype=torch.long)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
        x_t = schedule.q_sample(x, t, noise)
        pred = schedule.predict_x0(middle(x_t), t, network(x_t, t).float())
        x, x_t = middle(x), middle(x_t)
    rows = [torch.cat([a, b.clamp(-1, 1), c], dim=-1) for a, b, c in zip(x[:, 0], x_t[:, 0], pred[:, 0])]
    grid = ((torch.cat(rows, dim=-2).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


COMPILE_ALONE = ("--compile trains in one process only (not tried with several, where DDP splits the graph); "
                 "leave out --compile, or --nproc and torchrun.")


def compiled(module, batch_shape, device, amp: bool):
    """``torch.compile(module)``, compiled now, on a zero batch of the training shape (forward and backward
    graphs are built at the first call): a compiler that is missing or fails is one InputError before any
    step, not a traceback mid-run."""
    import torch

    fast = torch.compile(module)
    try:
        x = torch.zeros(batch_shape, device=device)
        t = torch.zeros(batch_shape[0], dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            fast(x, t)
    except Exception as exc:  # the compiler's errors are many kinds (missing C++ compiler, Triton, lowering)
        # Their first line says what failed; the last ones tell how to get torch's own trace.
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise InputError(f"torch.compile could not build the network ({reason}); train without compiling "
                         "(leave out --compile): the same training, slower on a GPU.") from None
    return fast


def run_dir_for(output: Path) -> Path:
    return output.with_name(output.name.split(".")[0] + ".run")


# Settings a resumed run may change: they do not alter the network or what it has learnt so far.
RESUMABLE_CHANGES = ("steps", "target_fpr", "checkpoint_every", "preview_every", "device", "name", "description",
                     "inference", "precision", "compile")
CHECKPOINT_KEYS = ("network", "ema", "optimizer", "generator", "step", "losses", "elapsed_s", "settings")


def read_checkpoint(path: Path, settings: TrainingSettings, device) -> Dict:
    """The saved state of a run, after checking it is ours and that ``settings`` may continue it.

    Loaded with ``weights_only=True`` (no code runs); anything unreadable or foreign is an InputError."""
    import torch

    fresh = "start afresh with --overwrite"
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # torch raises many kinds (pickle, zip, EOF, runtime), with long texts, for a damaged file
        raise InputError(f"{path}: not a readable training checkpoint (damaged, or not written by synomaly); "
                         f"{fresh}.") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS) \
            or not isinstance(state["settings"], dict) or isinstance(state["step"], bool) \
            or not isinstance(state["step"], int) or not isinstance(state["losses"], list) \
            or not 0 <= state["step"] == len(state["losses"]):
        raise InputError(f"{path}: not a Synomaly training checkpoint; {fresh}.")
    now = settings.to_dict()
    # A setting the saved run does not name came after the engine that wrote it: that run had its default.
    saved = {**TrainingSettings().to_dict(), **state["settings"]}
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise InputError("cannot resume: " + ", ".join(f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})"
                                                       for k in changed)
                         + f" differ from the saved run, and only {', '.join(RESUMABLE_CHANGES)} may change; "
                         f"resume with the saved values, or {fresh}.")
    if settings.steps < state["step"]:
        raise InputError(f"cannot resume: the saved run is at step {state['step']}, beyond the {settings.steps} "
                         f"steps asked for; give at least {state['step']} steps.")
    return state


def check_run(output, settings: TrainingSettings, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse settings, and a model file or run folder, that ``train`` would refuse; return the model path.

    Instant (no data read, nothing written), so that a launcher can check a run before starting it."""
    settings.validate()
    output = Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise OutputError(f"{output}: model files end in .safetensors.")
    if resume and overwrite:
        raise InputError("resume continues the saved run and overwrite starts afresh; choose one.")
    run_dir = run_dir_for(output)
    checkpoint_path = run_dir / "checkpoint.pt"
    for path in (output, run_dir):
        if path.exists() and path.is_dir() != (path == run_dir):
            raise OutputError(f"{path} is in the way ({'not a folder' if path == run_dir else 'a folder'}); "
                              "move it or choose another model file.")
    leftovers = output.exists() or (run_dir.exists() and any(run_dir.iterdir()))
    if not (resume or overwrite):
        if output.exists():
            raise OutputError(f"{output} already exists; continue its run (--resume), replace it (--overwrite) "
                              "or choose another model file.")
        if checkpoint_path.exists():
            raise OutputError(f"{run_dir} holds an earlier run; continue it (--resume) or start afresh "
                              "(--overwrite).")
        if leftovers:
            raise OutputError(f"{run_dir} holds files of an earlier run that has no checkpoint; start afresh "
                              "(--overwrite) or choose another model file.")
    if resume and not checkpoint_path.is_file():
        how = "start afresh with --overwrite instead of --resume" if leftovers else "start a new run without --resume"
        raise OutputError(f"nothing to resume: {checkpoint_path} does not exist; {how}.")
    return output


def train(healthy, output, settings: Optional[TrainingSettings] = None,
          progress: Optional[Callable[[int, int, float, str], None]] = None,
          cancel: Optional[Callable[[], bool]] = None, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a model on healthy volumes and write the calibrated model file to ``output``.

    ``healthy``: paths (see ``find_cases``) or TrainingCase objects. ``progress(step, total, loss, msg)``
    is called after each step (and its checkpoint, when one is due). ``cancel()`` is polled every step
    and during calibration; on cancel the checkpoint is saved at the current step and Cancelled is
    raised, so ``resume=True`` continues where it stopped. ``overwrite=True`` starts afresh, replacing
    an earlier model file and run folder. Settings, the output and the saved run are checked before
    any data are read; nothing is written until the data are found good.

    Started by torchrun in several processes (``synomaly.distributed``), every process calls ``train``
    with the same arguments and trains on its share of every batch; the loss curve is that of one
    process up to floating-point rounding. Rank 0 alone writes the run folder, calibrates and writes
    the model; the others return once the last step is trained. A stop request in any process stops
    all at the same step.
    """
    from .distributed import Team

    team = Team.from_environment()
    try:
        return _train(team, healthy, output, settings or TrainingSettings(), progress, cancel, resume, overwrite)
    finally:
        team.leave()


def _train(team, healthy, output, settings: TrainingSettings, progress, cancel, resume: bool, overwrite: bool) -> Path:
    report = progress or (lambda step, total, loss, msg: None)
    with team.together():  # every process checks and reads alike; an error in one stops all before any write
        if settings.compile and team.world_size > 1:
            raise InputError(COMPILE_ALONE)
        output = check_run(output, settings, resume, overwrite)
        run_dir = run_dir_for(output)
        checkpoint_path = run_dir / "checkpoint.pt"

        # torch only now: refusals above are instant.
        import torch

        from .detection import DEFAULT_INFERENCE
        from .distributed import check_share
        from .multistage import middle
        from .network import UNet, count_parameters
        from .noise import make_noise
        from .presets import get_preset, missing_mask_message
        from .preprocessing import PreprocessConfig
        from .runtime import resolve_training_precision
        from .schedule import DiffusionSchedule

        device = team.resolve_device(settings.device)
        check_share(team.world_size, settings.batch_size)
        preset = get_preset(settings.preset)

        torch.manual_seed(settings.seed)
        config = settings.network_config()
        network = UNet(config).to(device)
        ema = UNet(config).to(device)
        ema.load_state_dict(network.state_dict())
        ema.requires_grad_(False)
        optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        schedule = DiffusionSchedule(settings.num_steps, settings.schedule)
        generator = torch.Generator().manual_seed(settings.seed)
        start, losses, elapsed = 0, [], 0.0
        if resume:
            state = read_checkpoint(checkpoint_path, settings, device)
            try:
                network.load_state_dict(state["network"])
                ema.load_state_dict(state["ema"])
                optimizer.load_state_dict(state["optimizer"])
                generator.set_state(state["generator"])
                start, losses, elapsed = state["step"], [float(v) for v in state["losses"]], float(state["elapsed_s"])
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{checkpoint_path}: does not match its own settings ({last_line(exc)}); "
                                 "start afresh with --overwrite.") from None

        cases = find_cases(healthy)
        unmasked = [case.name for case in cases if case.mask is None]
        mask_needed = missing_mask_message(settings.preset, "train")
        if unmasked and mask_needed:
            raise InputError(f"{len(unmasked)} of {len(cases)} training cases have no mask "
                             f"({', '.join(unmasked[:5])}{', ...' if len(unmasked) > 5 else ''}): {mask_needed}")
        preprocess = PreprocessConfig(intensity=preset.intensity, window=preset.window, image_size=settings.image_size,
                                      disc_margin_px=preset.disc_margin_px, disc_margin_mm=preset.disc_margin_mm,
                                      context_slices=settings.context_slices)
        report(0, settings.steps, float("nan"), f"extracting slices from {len(cases)} volumes")
        data = extract_slices(cases, settings, preprocess)
        share, weight = team.share(settings.batch_size)
        per_process = len(range(settings.batch_size)[share])
        precision = resolve_training_precision(device, settings.precision, per_process, settings.compile)
        amp = precision == "bf16"
        if settings.compile:  # before the run folder is made: a compiler that fails leaves nothing behind
            report(start, settings.steps, float("nan"), "compiling the network (a minute or two)")
            network.train()  # compiled in the mode it trains in
            fast_network = compiled(network, (per_process,) + tuple(data.images.shape[1:]), device, amp)
    with team.together():
        if team.main:
            try:
                if overwrite and run_dir.exists():
                    shutil.rmtree(run_dir)
                (run_dir / "previews").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{run_dir}: cannot be created ({exc.strerror or exc}); "
                                  "choose another model file.") from None

    def save_checkpoint(step):
        _save_atomic_torch({"network": network.state_dict(), "ema": ema.state_dict(),
                            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "step": step, "losses": losses, "elapsed_s": elapsed + time.perf_counter() - t_start,
                            "settings": settings.to_dict()}, checkpoint_path)
        with open(run_dir / "loss.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows([(i + 1, f"{v:.6f}") for i, v in enumerate(losses)])

    def stop_if_asked(step):
        if team.any(cancel is not None and cancel()):
            if team.main:
                save_checkpoint(step)
            team.barrier()  # the others end only once it is saved: a launcher stops the rest when one ends
            raise Cancelled(f"training stopped at step {step} of {settings.steps}; checkpoint saved in {run_dir}")

    n = data.images.shape[0]
    preview_images = data.images[torch.linspace(0, n - 1, min(4, n)).long()]
    module = fast_network if settings.compile else team.wrap(network)  # compile is for one process alone
    module.train()
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in network.parameters()]
    t_start = time.perf_counter()
    for step in range(start, settings.steps):
        stop_if_asked(step)
        # Every process draws the whole batch, so the generator (and with it a checkpoint) does not depend
        # on the process count, and trains on its share of it.
        idx = torch.randint(n, (settings.batch_size,), generator=generator)
        keep = data.keep[idx].clone() if data.keep is not None else None
        x, m, keep = augment(data.images[idx].clone(), data.masks[idx].clone(), settings, generator, keep)
        t = torch.randint(0, settings.max_timestep, (x.shape[0],), generator=generator)
        blobs_where = m if keep is None else m & keep
        # Drawn from the CPU generator (runs reproduce whatever the device), shaped on the device.
        noise = make_noise(settings.noise, x.shape, generator=generator, organ_mask=blobs_where, device=device,
                           **preset.noise_params())
        x, t, noise = x[share].to(device), t[share].to(device), noise[share]
        x_t = schedule.q_sample(x, t, noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            eps = module(x_t, t)
        eps = eps.float()
        target = middle(noise)  # with neighbouring slices as channels, the network answers for the middle one
        error = (eps - target).abs() if settings.loss == "l1" else (eps - target) ** 2
        if keep is None:
            loss = error.mean()
        else:  # grown lesions count for nothing: the network is never taught what a lesion's noise looks like
            weights = keep[share].to(device, dtype=error.dtype)
            loss = (error * weights).sum() / weights.sum().clamp(min=1.0)
        if settings.loss == "hybrid":
            loss = loss + schedule.vlb_term(middle(x), middle(x_t), t, eps).mean() * 1e-3
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()  # gradients averaged over processes: those of the whole batch's mean loss
        torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        losses.append(team.mean(float(loss.detach()), weight))
        if team.main and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            save_checkpoint(step + 1)
        recent = float(np.mean(losses[-50:]))
        report(step + 1, settings.steps, recent, f"step {step + 1}/{settings.steps} loss {recent:.4f}")
        if team.main and ((step + 1) % settings.preview_every == 0 or step + 1 == settings.steps):
            ema.eval()
            _write_preview(run_dir / "previews" / f"step_{step + 1:06d}.png", ema, schedule, preview_images, device)
    stop_if_asked(settings.steps)
    if not team.main:
        return output
    wall = elapsed + time.perf_counter() - t_start

    report(settings.steps, settings.steps, float(np.mean(losses[-50:])) if losses else float("nan"), "calibrating")
    inference = dict(DEFAULT_INFERENCE)
    inference["direction"] = int(preset.direction[0]) if len(preset.direction) == 1 else 1
    inference["signed"] = len(preset.direction) == 1
    inference.update(settings.inference)
    metadata = {
        "name": settings.name or output.stem,
        "description": settings.description or f"{settings.preset} model trained on {len(cases)} "
                       f"{'images' if all(is_2d(c.image.shape) for c in cases) else 'volumes'}",
        "preset": settings.preset,
        "noise": {"kind": settings.noise, **preset.noise_params()},
        "schedule": schedule.to_dict(),
        "preprocessing": preprocess.to_dict(),
        "inference": inference,
        "threshold": 0.0,
        "training": {"settings": settings.to_dict(), "data": data.summary, "steps": settings.steps,
                     "wall_time_s": round(wall, 1), "device": str(device), "precision": precision,
                     "world_size": team.world_size,
                     "parameters": count_parameters(network),
                     "final_loss": float(np.mean(losses[-50:])) if losses else None},
    }
    from .model_file import SynomalyModel

    ema.eval()
    model = SynomalyModel(ema, metadata)
    try:
        metadata["calibration"] = calibrate(model, cases, data.validation, settings.target_fpr, device, cancel=cancel)
    except Cancelled:
        raise Cancelled(f"training stopped while calibrating, after all {settings.steps} steps; checkpoint saved "
                        f"in {run_dir}") from None
    metadata["threshold"] = metadata["calibration"]["threshold"]
    from .model_file import save_model

    save_model(output, ema.cpu(), metadata)
    report(settings.steps, settings.steps, float(np.mean(losses[-50:])) if losses else float("nan"), "done")
    return output


def _healthy_values(model, case: TrainingCase, device, cancel, slices=None) -> Tuple[np.ndarray, np.ndarray]:
    """Our map's values and the baseline's scores on one case's healthy foreground voxels: of ``slices``
    (reoriented axial indices) when given, else of the whole volume; labelled voxels never count."""
    from .baseline import baseline_for, lesion_direction
    from .detection import DetectionSettings, detect

    # The model is calibrated on what it was trained on, stripped or not: no skull check here.
    result = detect(case.image, case.geometry, model, case.mask,
                    DetectionSettings(device=str(device), maps_only=True, skull_check=False), cancel=cancel,
                    slices=slices)
    prepared = result.prepared
    region = prepared.foreground.copy()
    if slices is not None:
        chosen = np.zeros(region.shape, dtype=bool)
        chosen[list(slices)] = True
        region &= chosen
    region = prepared.orientation.invert(region)  # the map and the baseline's scores are in the input's grid
    if case.labels is not None:
        region &= ~(case.labels > 0)
    scores = baseline_for(prepared, direction=lesion_direction(model.metadata))
    return result.anomaly_map[region], scores[region]


def healthy_validation_scores(model, cases: Sequence[TrainingCase], validation: Dict[int, List[int]],
                              device, cancel: Optional[Callable[[], bool]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Our anomaly-map values and the intensity baseline's scores on held-out healthy foreground voxels."""
    pairs = [_healthy_values(model, cases[ci], device, cancel, slices=val) for ci, val in validation.items() if val]
    if not pairs:
        raise InputError("no healthy validation slices to calibrate on; give more healthy volumes "
                         "or raise validation_fraction.")
    return np.concatenate([o for o, _ in pairs]), np.concatenate([b for _, b in pairs])


def healthy_volume_scores(model, cases: Sequence[TrainingCase], device="auto",
                          cancel: Optional[Callable[[], bool]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Our map and the baseline's scores on every unlabelled foreground voxel of whole volumes.

    For calibrating on patients the model never saw: held-out slices of training patients give maps
    with lighter tails than a new patient's, and a threshold set on them lets through several times
    its target on new patients (measured: 0.2 % became 2 %)."""
    pairs = [_healthy_values(model, case, device, cancel) for case in cases]
    if not pairs:
        raise InputError("no volumes to calibrate on.")
    return np.concatenate([o for o, _ in pairs]), np.concatenate([b for _, b in pairs])


def calibrate(model, cases: Sequence[TrainingCase], validation: Dict[int, List[int]], target_fpr: float,
              device, baseline_target_fpr: Optional[float] = None,
              cancel: Optional[Callable[[], bool]] = None) -> Dict:
    """Anomaly threshold = the map value exceeded by ``target_fpr`` of held-out healthy foreground voxels.

    The intensity baseline's threshold is calibrated on the same voxels (at its own target when one was
    chosen for it by the same procedure), so evaluations compare like with like.
    """
    from .baseline import calibrate_threshold, lesion_direction

    base_fpr = target_fpr if baseline_target_fpr is None else float(baseline_target_fpr)
    ours, base = healthy_validation_scores(model, cases, validation, device, cancel)
    return {"threshold": float(calibrate_threshold(ours, target_fpr)), "target_fpr": target_fpr,
            "voxels": int(ours.size), "baseline_threshold": float(calibrate_threshold(base, base_fpr)),
            "baseline_target_fpr": base_fpr, "baseline_median_size": 5,
            "baseline_direction": lesion_direction(model.metadata)}


def settings_from_model(metadata: Dict) -> TrainingSettings:
    saved = dict(metadata["training"]["settings"])
    for key in ("channel_mult", "attention_resolutions"):
        saved[key] = tuple(saved[key])
    return TrainingSettings(**{k: v for k, v in saved.items() if k in TrainingSettings.__dataclass_fields__})


def recalibrate(model_path, healthy, output=None, inference: Optional[Dict] = None, target_fpr=None,
                device: str = "auto", baseline_target_fpr=None) -> Path:
    """Calibrate a trained model again on the same held-out healthy slices (the split is reproducible
    from the stored settings), optionally with new inference defaults; writes ``output`` (default: in place)."""
    from .detection import resolve_device
    from .model_file import load_model, save_model
    from .preprocessing import PreprocessConfig

    model = load_model(model_path)
    settings = settings_from_model(model.metadata)
    cases = find_cases(healthy)
    data = extract_slices(cases, settings, PreprocessConfig.from_dict(model.metadata["preprocessing"]))
    if inference:
        model.metadata["inference"].update(inference)
    fpr = settings.target_fpr if target_fpr is None else target_fpr
    _check_number(fpr, "target false-positive rate", 0.0, 1.0)
    model.metadata["calibration"] = calibrate(model, cases, data.validation, fpr, resolve_device(device),
                                              baseline_target_fpr)
    model.metadata["threshold"] = model.metadata["calibration"]["threshold"]
    return save_model(Path(output or model_path), model.network.cpu(), model.metadata)
