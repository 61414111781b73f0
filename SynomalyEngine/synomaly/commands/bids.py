"""BIDS in, BIDS derivatives out: ``synomaly detect BIDS_ROOT --bids``.

pybids finds the FLAIR images of a raw BIDS dataset (suffix FLAIR, optionally narrowed by ``--bids-filter``,
a JSON object of entities such as ``{"session": "01"}``); they go through the cohort machinery (shards, finished
inputs skipped, failures.csv and summary.csv) and their outputs form a BIDS derivatives dataset
(``BIDS_ROOT/derivatives/synomaly`` unless ``-o``): ``dataset_description.json`` (GeneratedBy: synomaly, its
version, the model and its id; SourceDatasets: the raw dataset) and, per image,
``sub-X/[ses-Y/]anat/sub-X_[ses-Y_]space-orig_desc-anomaly_mask.nii.gz`` (the segmentation), ``..._desc-anomaly_map``,
``..._desc-counterfactual_FLAIR``, each with a JSON sidecar; the mask's sidecar is the set's report (settings,
scores, sources), so that synomaly knows its own files as everywhere else.
"""
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from synomaly.commands.cohort import CohortInput, FoundInputs
from synomaly.errors import InputError, OutputError
from synomaly.files.outputs import BIDS_REPORT, BIDS_SPACE
from synomaly.files.volume_io import atomic_write_bytes

BIDS_VERSION = "1.9.0"
DERIVATIVES_NAME = "synomaly"
SPACE = "orig"  # outputs lie on the input's own voxel grid (files/outputs.BIDS_SPACE: the names known as ours)
NIFTI_EXTENSIONS = [".nii.gz", ".nii"]


def default_output(root: Path) -> Path:
    return Path(root) / "derivatives" / DERIVATIVES_NAME


def parse_filter(text: Optional[str]) -> Dict:
    """``--bids-filter '{"session": "01"}'`` -> the entities pybids selects by."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--bids-filter {text}: not JSON ({exc}); give an object such as "
                         "'{\"session\": \"01\"}'.") from None
    if not isinstance(value, dict) or any(k in ("suffix", "extension", "scope") for k in value):
        raise InputError(f"--bids-filter {text}: give a JSON object of BIDS entities (subject, session, acquisition, "
                         "run, ...); the suffix is FLAIR.")
    return value


def _layout(root: Path):
    try:
        from bids import BIDSLayout
    except ImportError:
        raise InputError("--bids needs pybids: pip install 'synomaly[bids]' (or pip install pybids).") from None
    if not (root / "dataset_description.json").is_file():
        raise InputError(f"{root}: not a BIDS dataset (no dataset_description.json); give the dataset's root folder.")
    try:
        return BIDSLayout(str(root), validate=False)
    except Exception as exc:
        raise InputError(f"{root}: cannot be read as a BIDS dataset ({exc}).") from None


def find_bids_inputs(arguments, masks, output: Optional[Path], filters: Dict) -> FoundInputs:
    """The FLAIR images of one raw BIDS dataset, named by their BIDS file name less the suffix
    (``sub-01_ses-01``), sorted by path; outputs under ``output`` are never inputs."""
    if len(arguments) != 1:
        raise InputError(f"--bids takes one INPUT, the root of a BIDS dataset; {len(arguments)} given.")
    if masks:
        raise InputError("--mask does not go with --bids; the FLAIR images of a BIDS dataset are taken as they are.")
    root = Path(arguments[0]).expanduser()
    layout = _layout(root)
    try:
        files = layout.get(suffix="FLAIR", extension=NIFTI_EXTENSIONS, return_type="filename", **filters)
    except (ValueError, TypeError) as exc:
        raise InputError(f"--bids-filter: {exc}") from None
    out = os.path.realpath(output) if output is not None else None
    paths = sorted(Path(f) for f in files if out is None or not os.path.realpath(f).startswith(out + os.sep))
    if not paths:
        raise InputError(f"{root}: no FLAIR image (sub-*/[ses-*/]anat/*_FLAIR.nii[.gz]) "
                         f"{'matches --bids-filter ' + json.dumps(filters) if filters else 'found'}.")
    items = [CohortInput(p, None, _stem(p)) for p in paths]
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise InputError(f"{root}: two FLAIR images share the entities of {max(names, key=names.count)}.")
    return FoundInputs(items, cohort=True)


def _stem(path: Path) -> str:
    """``sub-01_ses-01_FLAIR.nii.gz`` -> ``sub-01_ses-01`` (the entities, in the file's own order)."""
    name = path.name
    for ext in NIFTI_EXTENSIONS:
        if name.endswith(ext):
            name = name[:-len(ext)]
    return name.rsplit("_", 1)[0]


def bids_output_paths(out_dir: Path, root: Path, item: CohortInput) -> Dict[str, Path]:
    """The derivatives' files of one input, in the folder that mirrors its own (``sub-X/ses-Y/anat``)."""
    folder = Path(out_dir) / Path(item.path).parent.relative_to(root)
    base = f"{item.name}_space-{SPACE}"
    return {"anomaly_seg": folder / f"{base}_desc-anomaly_mask.nii.gz",
            "anomaly_map": folder / f"{base}_desc-anomaly_map.nii.gz",
            "counterfactual": folder / f"{base}_desc-counterfactual_FLAIR.nii.gz",
            "uncertainty": folder / f"{base}_desc-uncertainty_map.nii.gz",
            "map_sidecar": folder / f"{base}_desc-anomaly_map.json",
            "counterfactual_sidecar": folder / f"{base}_desc-counterfactual_FLAIR.json",
            "overview": folder / f"{base}_desc-anomaly_overview.png",
            "report": folder / f"{item.name}{BIDS_SPACE}{BIDS_REPORT}"}


def _source(root: Path, path: Path) -> str:
    """A BIDS URI of a file of the raw dataset."""
    return "bids:raw:" + Path(path).relative_to(root).as_posix()


def write_sidecars(output_set, paths: Dict[str, Path], root: Path, item: CohortInput, result) -> None:
    """The BIDS fields of the mask's sidecar (the report) and the sidecars of the map and the counterfactual,
    staged with the set (written before the report lists the set's files)."""
    source = _source(root, item.path)
    settings = {"model": result.report.get("model"), "engine": result.report.get("engine"),
                "threshold": result.report.get("threshold"), "settings": result.report.get("settings")}
    result.report.update({"Description": "synomaly anomaly segmentation (1: anomalous)", "Type": "Lesion",
                          "Sources": [source], "SpatialReference": "orig"})
    for key, description in (("map_sidecar", "synomaly anomaly map (higher: more anomalous; the mask is its "
                                             "thresholded, post-processed form)"),
                             ("counterfactual_sidecar", "synomaly counterfactual: the FLAIR image as the model "
                                                        "restores it to healthy, in the input's units")):
        sidecar = {"Description": description, "Sources": [source], "SpatialReference": "orig", **settings}
        atomic_write_bytes(output_set.stage(paths[key]), (json.dumps(sidecar, indent=2) + "\n").encode())


def dataset_description(root: Path, model) -> dict:
    from synomaly import __version__

    return {"Name": "synomaly anomaly detection", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "synomaly", "Version": __version__,
                             "Description": f"unsupervised anomaly detection; model {model.name} "
                                            f"(model id {model.model_id})"}],
            "SourceDatasets": [{"URL": Path(os.path.realpath(root)).as_uri()}],
            "DatasetLinks": {"raw": Path(os.path.realpath(root)).as_uri()},
            "SynomalyModel": {"name": model.name, "model_id": model.model_id}}


def write_dataset_description(out_dir: Path, root: Path, model, overwrite: bool) -> None:
    """``dataset_description.json`` of the derivatives: written when absent; one of synomaly's for another
    model is refused without --overwrite (one derivatives dataset, one model); one not of synomaly, always."""
    path = Path(out_dir) / "dataset_description.json"
    wanted = dataset_description(root, model)
    if path.exists():
        try:
            present = json.loads(path.read_text(encoding="utf-8"))
            ours = any(g.get("Name") == "synomaly" for g in present.get("GeneratedBy", []))
        except (OSError, ValueError, AttributeError, TypeError):
            present, ours = None, False
        if not ours:
            raise OutputError(f"{path} exists and was not written by synomaly; choose another -o folder.")
        if present == wanted:
            return
        known = (present.get("SynomalyModel") or {}).get("model_id")
        if known != model.model_id and not overwrite:
            raise OutputError(f"{path}: these derivatives were made with model id {known}, not {model.model_id}; "
                              "use another -o folder, or --overwrite to redo them with this model.")
    atomic_write_bytes(path, (json.dumps(wanted, indent=2) + "\n").encode())


def bids_items_root(arguments: List[str]) -> Path:
    return Path(arguments[0]).expanduser()
