"""The slices a network trains on: extracted from the cases, some held out for calibration, and augmented.

2D images (volumes of one slice) are one slice each; their validation images are whole groups (the CSV's
``group`` column: one acquisition or patient), so that calibration never sees a neighbouring frame of a
training image."""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from synomaly.errors import InputError
from synomaly.files.volume_io import is_2d
from synomaly.training.cases import TrainingCase
from synomaly.training.settings import TrainingSettings


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


def _held_out_slices(cases, prepared_cases, val_blocks) -> Tuple[List[set], set]:
    """Per case, the axial indices kept out of training, and the cases that calibrate on none of theirs.
    3D volumes of one group (the same scan at other slice thicknesses, or rescans of a patient) hold out the
    same stretch of the body: the first of them chooses its blocks, the others leave out the slices that
    overlap them and calibrate on none (the first one's are the same tissue)."""
    held, followers, leaders = [], set(), {}
    for ci, (case, prepared) in enumerate(zip(cases, prepared_cases)):
        nz = prepared.foreground.shape[0]
        leader = leaders.setdefault(case.group, ci) if case.group and not is_2d(case.image.shape) else ci
        if leader == ci:
            held.append({z for z in range(nz) if z // 8 in val_blocks[ci]})
            continue
        n_lead = prepared_cases[leader].foreground.shape[0]
        ranges = [(8 * b / n_lead, min(8 * (b + 1), n_lead) / n_lead) for b in val_blocks[leader]]
        held.append({z for z in range(nz) if any(z / nz < hi and (z + 1) / nz > lo for lo, hi in ranges)})
        followers.add(ci)
    return held, followers


def extract_slices(cases: Sequence[TrainingCase], settings: TrainingSettings, preprocess) -> SliceSet:
    """Healthy axial slices of every case, split by blocks of 8 slices into training and validation;
    2D images (one slice each) by whole groups (``TrainingCase.group``). With ``lesion_slices="mask"``
    the lesion slices train too (their grown lesion masked out); validation keeps lesion-free slices only."""
    import torch

    from synomaly.inference.preprocessing import prepare_volume
    from synomaly.method.presets import get_preset, two_d_refusal

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
    held_out, followers = _held_out_slices(cases, prepared_cases, val_blocks)
    masking = any(m is not None for m in masked)
    images, masks, keeps, validation, per_case = [], [], [], {}, []
    for ci, (case, prepared, healthy) in enumerate(zip(cases, prepared_cases, healthy_slices)):
        val = [] if ci in followers else [z for z in healthy if z in held_out[ci]]
        train = [z for z in usable_slices[ci] if z not in held_out[ci]]
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
    """Random flips (the same for image, mask and ``keep``), a mild gamma / contrast change and (``intensity_shift``)
    a shift of the level inside the mask."""
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
    if settings.intensity_shift > 0:
        shift = ((torch.rand(b, generator=generator) * 2 - 1) * settings.intensity_shift * 2).view(-1, 1, 1, 1)
        x = torch.where(m, (x + shift).clamp(-1, 1), x)
    if settings.bias_field > 0:
        strength = torch.rand(b, generator=generator) * settings.bias_field
        strength[torch.rand(b, generator=generator) < 0.5] = 0.0
        field = torch.exp(strength.view(-1, 1, 1, 1) * random_bowls(b, x.shape[-2:], generator))
        x = torch.where(m, ((x + 1) * field - 1).clamp(-1, 1), x)
    return x, m, keep


def random_bowls(n: int, size, generator):
    """``n`` random smooth fields over a slice, (n, 1, H, W), each from -1 to 1: a tilt along both axes plus a
    quadratic bowl, as a receive coil's sensitivity falls off (``evaluation.altered_inputs.bias_field`` in 2D)."""
    import torch

    h, w = size
    y = torch.linspace(-1.0, 1.0, h).view(1, h, 1)
    x = torch.linspace(-1.0, 1.0, w).view(1, 1, w)
    c = torch.rand(n, 5, generator=generator) * 2 - 1
    field = (c[:, 0].view(-1, 1, 1) * x + c[:, 1].view(-1, 1, 1) * y + c[:, 2].view(-1, 1, 1) * x * x
             + c[:, 3].view(-1, 1, 1) * y * y + c[:, 4].view(-1, 1, 1) * x * y)
    field = field - field.mean(dim=(1, 2), keepdim=True)
    field = field / field.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return field.unsqueeze(1)
