"""The recipe of the shipped brain FLAIR model: which cases, which split, which settings.

Shared by train_brain_model.py, brain_flair_candidates.py and calibrate_brain_model.py so that every
step sees the same data.
Cases come from ``../shared/data/cases.csv`` (case, folder, use): the 28 ``training`` patients train and
choose; the 10 ``development`` cases are never read here (``synomaly evaluate --cases-csv`` reads them,
once per finished model).

Split for choosing settings (written down, seeded): the 28 training patients, sorted by name, are
permuted with ``numpy.random.default_rng(SPLIT_SEED)``; the first 6 are the selection patients (their
tumour labels may choose settings), the other 22 the fitting patients. The final model trains on all 28.
"""
import csv
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CASES_CSV = DATA / "cases.csv"
SPLIT_SEED = 2026
N_SELECTION = 6
# The 8 patients the first brain-flair weights trained on (1,750 steps of 8 on 2 CPU cores); the shipped
# model still carries those weights (see its card for why).
V1_PATIENTS = ("pat0003", "pat0004", "pat0005", "pat0006", "Brats18_CBICA_AAB_1", "Brats18_CBICA_AQN_1",
               "Brats18_CBICA_ASA_1", "Brats18_TCIA08_105_1")


def case_rows(use: str, cases_csv=CASES_CSV):
    """The rows of the case list with this use, sorted by case name."""
    with open(cases_csv, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row["use"].strip() == use]
    return sorted(rows, key=lambda row: row["case"])


def training_rows(cases_csv=CASES_CSV):
    return case_rows("training", cases_csv)


def split_patients(rows):
    """(fitting rows, selection rows), by patient."""
    rows = sorted(rows, key=lambda row: row["case"])
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    selection = sorted(int(i) for i in order[:N_SELECTION])
    return [r for i, r in enumerate(rows) if i not in selection], [rows[i] for i in selection]


def read_case(row, data=DATA):
    """A TrainingCase (image, brain mask when there is one, tumour labels) read from the NIfTI files."""
    from synomaly.training.cases import TrainingCase
    from synomaly.files.volume_io import read_volume

    folder = Path(data) / row["folder"]
    image, geometry = read_volume(folder / "flair.nii.gz")
    labels = read_volume(folder / "seg.nii.gz")[0] > 0
    mask = read_volume(folder / "brainmask.nii.gz")[0] > 0 if (folder / "brainmask.nii.gz").exists() else None
    return TrainingCase(row["case"], image, geometry, mask, labels)


def pack_case(case):
    """The case as compact arrays for a machine without the data or SimpleITK: cropped to the head plus 8
    voxels, intensities quantised to 8 bits over their range (steps of 0.4 % of it: far below MRI noise)."""
    head = case.image > case.image.min() if case.mask is None else case.mask
    idx = np.argwhere(head | case.labels)
    lo, hi = np.maximum(idx.min(0) - 8, 0), np.minimum(idx.max(0) + 9, case.image.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    image = case.image[box].astype(np.float64)
    vmin, vmax = float(image.min()), float(image.max())
    quantised = np.round((image - vmin) / max(vmax - vmin, 1e-12) * 255).astype(np.uint8)
    g = case.geometry
    origin = np.asarray(g.origin) + g.direction_matrix @ (lo[::-1] * np.asarray(g.spacing))
    arrays = {"image": quantised, "range": np.array([vmin, vmax]), "labels": np.packbits(case.labels[box]),
              "shape": np.array(quantised.shape), "spacing": np.array(case.geometry.spacing),
              "origin": origin, "direction": np.array(case.geometry.direction)}
    if case.mask is not None:
        arrays["mask"] = np.packbits(case.mask[box])
    return arrays


def unpack_case(name, arrays):
    from synomaly.training.cases import TrainingCase
    from synomaly.files.geometry import Geometry

    shape = tuple(int(n) for n in arrays["shape"])
    vmin, vmax = (float(v) for v in arrays["range"])
    image = (arrays["image"].astype(np.float32) * np.float32((vmax - vmin) / 255.0) + np.float32(vmin))

    def bits(key):
        return np.unpackbits(arrays[key], count=int(np.prod(shape))).reshape(shape).astype(bool)

    geometry = Geometry(spacing=tuple(float(v) for v in arrays["spacing"]),
                        origin=tuple(float(v) for v in arrays["origin"]),
                        direction=tuple(float(v) for v in arrays["direction"]))
    return TrainingCase(name, image, geometry, bits("mask") if "mask" in arrays else None, bits("labels"))


def load_cases(rows, pack=None):
    """TrainingCases of these rows, from ../shared/data or from a pack written by pack_brain_cases.py."""
    if pack is None:
        return [read_case(row) for row in rows]
    with np.load(pack) as data:
        out = []
        for row in rows:
            prefix = row["case"] + "/"
            out.append(unpack_case(row["case"], {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}))
        return out


def training_settings(steps: int, device: str = "auto", **changes):
    from synomaly.training.settings import TrainingSettings

    settings = dict(steps=steps, batch_size=8, num_res_blocks=1, min_slice_foreground=0.08, checkpoint_every=50,
                    preview_every=250, device=device, name="brain-flair",
                    description="Brain MRI FLAIR (BraTS 2015 + 2018, 28 patients' healthy tissue), Synomaly brain preset")
    settings.update(changes)
    return TrainingSettings(**settings)
