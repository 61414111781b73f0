"""The recipe of the liver CT model: which cases, which settings. Used by train_liver_model.py,
evaluate_liver_model.py and liver_ct_benchmark.py so all see exactly the same data and split.

Data: ../shared/data/liver-ct (see its README). Training (v2): every liver slice of ircad17 (contrast-enhanced,
0.74 x 0.74 x 1.6 mm, 512 x 512; its tumours grown by 10 mm left out of the loss and of the blobs) and of
totalseg-example (unenhanced, 3 mm), with copies of both resliced at 2.5 and 5 mm (``thicker_slices``), each
copy in its scan's group so that it holds out the same stretch of the body. Evaluation: lits117 (another
patient) and, marked as same-patient, ircad17; altered copies of them built by liver_ct_benchmark.py.
Nothing is chosen on the evaluation labels: every setting below was fixed before the first evaluation.
"""
import csv
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "liver-ct"
# The training list and the thicker copies go to the repository's ignored runs/ folder, never beside a model
# file (the bundled models' folder would ship them).
TRAINING_CSV = Path(__file__).resolve().parents[2] / "runs" / "liver-train.csv"
TRAINING = ("ircad17", "totalseg-example")
EVALUATION = (("lits117", "another patient"), ("ircad17", "same patient as training"))
THICKER_MM = (2.5, 5.0)  # training copies of each scan at these slice thicknesses (where thicker than its own)


def case_files(name: str) -> dict:
    folder = DATA / name
    files = {"image": folder / "ct.nii.gz", "mask": folder / "liver.nii.gz", "label": folder / "tumour.nii.gz",
             "name": name}
    if not files["label"].exists():
        files["label"] = ""
    return files


def thicker_copy(name: str, thickness_mm: float, folder: Path) -> dict:
    """The case resliced at ``thickness_mm`` into ``folder`` (written once); its files as ``case_files``."""
    from synomaly.evaluation.liver_phantoms import thicker_slices
    from synomaly.files.volume_io import read_volume, write_volume

    source = case_files(name)
    out = Path(folder) / f"{name}-{thickness_mm:g}mm"
    files = {"image": out / "ct.nii.gz", "mask": out / "liver.nii.gz",
             "label": out / "tumour.nii.gz" if source["label"] else "", "name": f"{name}-{thickness_mm:g}mm"}
    if files["image"].exists():
        return files
    image, geometry = read_volume(source["image"])
    masks = [read_volume(source["mask"])[0]] + ([read_volume(source["label"])[0]] if source["label"] else [])
    new, new_geometry, new_masks = thicker_slices(image, geometry, thickness_mm, masks)
    out.mkdir(parents=True, exist_ok=True)
    write_volume(files["mask"], new_masks[0].astype("uint8"), new_geometry)
    if source["label"]:
        write_volume(files["label"], new_masks[1].astype("uint8"), new_geometry)
    write_volume(files["image"], new.round().astype("int16"), new_geometry)
    return files


def write_training_csv(path: Path = TRAINING_CSV, thicker: bool = True) -> Path:
    """The training cases as the CSV list `synomaly train` takes (image,mask,label,name,group): the liver
    files are not named *mask*, so a folder would not pair them. ``thicker``: with the resliced copies
    (v2); without them, the v1 list."""
    from synomaly.files.volume_io import read_volume

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in TRAINING:
        rows.append(dict(case_files(name), group=name))
        if thicker:
            spacing = read_volume(case_files(name)["image"])[1].spacing[2]
            rows += [dict(thicker_copy(name, t, path.parent / "liver-thicker"), group=name)
                     for t in THICKER_MM if t > spacing]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label", "name", "group"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: str(v) for k, v in row.items()})
    return path


def training_settings(steps: int, device: str = "auto", lesion_slices: str = "mask"):
    from synomaly.training.settings import TrainingSettings

    # min_slice_foreground is a fraction of the whole slice: the liver covers 1-15 % of a 512 x 512 CT slice.
    return TrainingSettings(preset="liver-ct", steps=steps, batch_size=8, num_res_blocks=1, base_channels=32,
                            min_slice_foreground=0.01, checkpoint_every=50, preview_every=250, device=device,
                            lesion_slices=lesion_slices, lesion_margin_mm=10.0, intensity_shift=0.2,
                            # Chosen on the training patients' inserted lesions (liver_ct_benchmark.py): the
                            # smallest size that keeps at least half of the 10 mm ones (100: up to 10 false
                            # components a volume; 500: 3 of 8 found).
                            inference={"min_component_mm3": 250.0},
                            name="liver-ct",
                            description="Liver CT, tumours darker or brighter than the liver (all liver slices "
                                        "of one IRCAD patient, tumours masked out, and the TotalSegmentator "
                                        "example CT, at their own and thicker slices), Synomaly liver preset; "
                                        "needs a liver mask")
