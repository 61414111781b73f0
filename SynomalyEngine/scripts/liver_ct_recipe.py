"""The recipe of the liver CT model: which cases, which settings. Used by train_liver_model.py and
evaluate_liver_model.py so both see exactly the same data and split.

Data: ../shared/data/liver-ct (see its README). Training: the tumour-free liver slices of ircad17
(contrast-enhanced, 0.74 x 0.74 x 1.6 mm, 512 x 512) and totalseg-example (unenhanced, 3 mm).
Evaluation: the tumour slices of lits117 (another patient) and, marked as same-patient, of ircad17.
Nothing is chosen on the evaluation labels: every setting below was fixed before the first evaluation.
"""
import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "liver-ct"
TRAINING = ("ircad17", "totalseg-example")
EVALUATION = (("lits117", "another patient"), ("ircad17", "same patient as training"))


def case_files(name: str) -> dict:
    folder = DATA / name
    files = {"image": folder / "ct.nii.gz", "mask": folder / "liver.nii.gz", "label": folder / "tumour.nii.gz",
             "name": name}
    if not files["label"].exists():
        files["label"] = ""
    return files


def write_training_csv(path: Path) -> Path:
    """The training cases as the CSV list `synomaly train` takes (image,mask,label,name): the liver
    files are not named *mask*, so a folder would not pair them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label", "name"])
        writer.writeheader()
        for name in TRAINING:
            writer.writerow({k: str(v) for k, v in case_files(name).items()})
    return path


def training_settings(steps: int, device: str = "auto"):
    from synomaly.training.settings import TrainingSettings

    # min_slice_foreground is a fraction of the whole slice: the liver covers 1-15 % of a 512 x 512 CT slice.
    return TrainingSettings(preset="liver-ct", steps=steps, batch_size=8, num_res_blocks=1, base_channels=32,
                            min_slice_foreground=0.01, checkpoint_every=50, preview_every=250, device=device,
                            name="liver-ct",
                            description="Liver CT (tumour-free liver slices of one IRCAD patient and the "
                                        "TotalSegmentator example CT), Synomaly liver preset; needs a liver mask")
