"""A detection's outputs: their names and format (the input's own, so that its geometry is kept), checks
before any work (a writable folder, nothing replaced without --overwrite, never a file synomaly did not write),
and the set written together.

Which files are ours: a set's report (``NAME_report.json``, synomaly's engine named in it) lists the size of
every file of its set; a file is ours when such a report beside it names it at its size. Reports of engines
before that list nothing, and their sets count as ours."""
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from synomaly.errors import InputError, OutputError
from synomaly.files.overview import render_overview
from synomaly.files.volume_io import IMAGE_SUFFIXES, atomic_write_bytes, image_stem, is_2d, write_volume

OUTPUT_KINDS = ("anomaly_seg", "anomaly_map", "counterfactual")
FORMATS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "png": ".png"}
# NIfTI stores geometry in float32, so only a NIfTI input round-trips exactly through NIfTI;
# NRRD and MHA store it in full precision. DICOM folders and files and other inputs therefore get NRRD.
# 2D PNG and JPEG images get PNG (lossless: a JPEG segmentation would not be one), see write_outputs.
INPUT_FORMATS = ((".nii.gz", "nii.gz"), (".nii", "nii.gz"), (".nrrd", "nrrd"), (".nhdr", "nrrd"),
                 (".mha", "mha"), (".mhd", "mha"), (".png", "png"), (".jpg", "png"), (".jpeg", "png"))
# The anomaly map as a 16-bit PNG: grey level = value / MAP_PNG_FULL_SCALE * 65535. The map is a difference
# of two images on the [-1, 1] scale, so 2 holds every value; the exact floats go beside it as NRRD.
MAP_PNG_FULL_SCALE = 2.0
# What ends the name of every file of a set (NAME_anomaly_map.nii.gz, NAME_report.json, ...).
SET_SUFFIXES = tuple(f"_{kind}" for kind in OUTPUT_KINDS + ("uncertainty", "overview", "report"))
# A BIDS derivatives set (``commands/bids``): sub-X_ses-Y_space-orig_desc-..., its report the mask's sidecar.
BIDS_SPACE, BIDS_REPORT = "_space-orig_", "desc-anomaly_mask.json"


def case_name(path: Path) -> str:
    """Outputs are named after their input: ``/x/patient1.nii.gz`` -> ``patient1``; a DICOM folder -> its
    folder name (also for ``.``)."""
    name = path.name or Path(os.path.realpath(path)).name
    suffix = next((s for s in IMAGE_SUFFIXES + (".dcm",) if name.lower().endswith(s)), "")
    return name[:len(name) - len(suffix)]


def output_format(path: Path, requested: str) -> str:
    """``auto``: the input's own format, so that the outputs keep its geometry exactly."""
    if requested != "auto":
        return requested
    name = path.name.lower()
    return next((fmt for suffix, fmt in INPUT_FORMATS if name.endswith(suffix)), "nrrd")


def check_writable(folder: Path) -> None:
    """Fail before any work when outputs could not be written. A missing folder is not made yet (the
    run makes it when it starts, see ``output_set.OutputFolder``); its nearest existing parent is checked."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"output folder {folder} cannot be created: {existing} is a file; "
                          "choose another with -o.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=str(existing))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {folder} cannot be written ({exc.strerror or exc}); "
                          "choose another with -o.") from None


def output_paths(out_dir: Path, name: str, fmt: str) -> dict:
    """Every output a run may write; the uncertainty map only exists for ensembles. PNG holds integers,
    so the float maps of a PNG set also go as NRRD (``anomaly_map_values``, ``uncertainty``)."""
    ext = FORMATS[fmt]
    paths = {kind: out_dir / f"{name}_{kind}{ext}" for kind in OUTPUT_KINDS + ("uncertainty",)}
    if fmt == "png":
        paths["anomaly_map_values"] = out_dir / f"{name}_anomaly_map.nrrd"
        paths["uncertainty"] = out_dir / f"{name}_uncertainty.nrrd"
    paths["report"] = out_dir / f"{name}_report.json"
    paths["overview"] = out_dir / f"{name}_overview.png"
    return paths


def check_output_format(path: Path, paths: dict, volume, geometry) -> None:
    """PNG outputs only for a 2D image without origin or direction (which PNG cannot keep): refused
    before any work, with the format that fits."""
    import numpy as np

    if paths["anomaly_seg"].suffix != ".png":
        return
    if not is_2d(volume.shape) or volume.shape[0] != 1:
        raise InputError(f"{path}: PNG holds 2D images, and this is a volume of size "
                         f"{tuple(reversed(volume.shape))}; choose --format nrrd (or auto).")
    if not np.allclose(geometry.origin, 0.0) or not np.allclose(geometry.direction_matrix, np.eye(3)):
        raise InputError(f"{path}: PNG keeps no origin or direction, and this image has them; choose "
                         "--format nrrd (or auto), which keeps its geometry.")


def our_report(path: Path) -> Optional[Dict]:
    """The report at ``path`` when synomaly wrote it, else None."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    engine = report.get("engine") if isinstance(report, dict) else None
    return report if isinstance(engine, dict) and engine.get("name") == "synomaly" else None


def written_by_us(path: Path, report_path: Path) -> bool:
    """Whether ``path`` is a file of the set whose report is ``report_path`` (see the module's docstring)."""
    report = our_report(report_path)
    if report is None:
        return False
    if Path(path) == Path(report_path):
        return True
    sizes = report.get("outputs")
    if not isinstance(sizes, dict):
        return True
    try:
        return sizes.get(Path(path).name) == Path(path).stat().st_size
    except OSError:
        return False


def is_our_output(path: Path) -> bool:
    """A file of one of our sets (never an input to detect or train on), told by its name and its set's report."""
    stem = image_stem(path) if not path.name.endswith((".json", ".dcm")) else path.name.rsplit(".", 1)[0]
    bids_report = path.parent / f"{stem.split(BIDS_SPACE)[0]}{BIDS_SPACE}{BIDS_REPORT}"
    if BIDS_SPACE in stem and written_by_us(path, bids_report):  # BIDS derivatives: the mask's sidecar reports
        return True
    suffix = next((s for s in SET_SUFFIXES if stem.endswith(s)), None)
    return suffix is not None and written_by_us(path, path.parent / f"{stem[:-len(suffix)]}_report.json")


def refuse_foreign(paths: Dict) -> None:
    """Refuse, before any work, to replace a file of this set's names that synomaly did not write."""
    in_the_way = [p for p in dict.fromkeys(paths.values()) if p.is_dir()]
    if in_the_way:
        raise OutputError(f"{in_the_way[0]}: cannot be written (a folder of that name is in the way); remove it or "
                          "choose another -o folder.")
    foreign = [p for p in dict.fromkeys(paths.values()) if p.exists() and not written_by_us(p, paths["report"])]
    if foreign:
        raise OutputError(f"{foreign[0]} exists and was not written by synomaly ({len(foreign)} such files); "
                          "synomaly replaces only its own outputs: move them, or choose another -o folder.")


def refuse_inputs_as_outputs(inputs: List[Path], sets: Dict[str, Dict]) -> None:
    """An input (image, mask, list) is never an output of the same run: refused before any work."""
    real = {os.path.realpath(Path(p).expanduser()): Path(p) for p in inputs}
    for name, paths in sets.items():
        for path in paths.values():
            clash = real.get(os.path.realpath(path.expanduser()))
            if clash is not None:
                raise InputError(f"{clash} is an input of this run and would be replaced by the outputs of {name}; "
                                 "choose another -o folder.")


def refuse_existing(paths) -> None:
    """Outputs are never replaced without --overwrite."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise OutputError(f"{existing[0]} already exists ({len(existing)} outputs in all); "
                          "use --overwrite to replace them, or another -o folder.")


def write_outputs(output_set, paths: dict, result, geometry, volume, ground_truth=None, more=None) -> None:
    """Write one case's outputs as a set (see ``output_set``): staged, then moved into place, the report
    last. Files already staged in ``output_set`` (the demo's inputs) are moved with them; ``more(output_set)``
    stages further files of the set (DICOM, Slicer, BIDS sidecars), which the report lists as the others."""
    notes = result.report.setdefault("warnings", [])
    if "anomaly_map_values" in paths:
        _write_png_outputs(output_set, paths, result, geometry, volume, notes)
    else:
        write_volume(output_set.stage(paths["anomaly_seg"]), result.segmentation, geometry, notes)
        write_volume(output_set.stage(paths["anomaly_map"]), result.anomaly_map, geometry, notes)
        write_volume(output_set.stage(paths["counterfactual"]), result.counterfactual, geometry, notes)
    if result.uncertainty is not None:
        write_volume(output_set.stage(paths["uncertainty"]), result.uncertainty, geometry, notes)
    render_overview(volume, result.counterfactual, result.anomaly_map, result.segmentation,
                    output_set.stage(paths["overview"]), ground_truth=ground_truth, geometry=geometry,
                    map_max=max(result.report["threshold"] * 2, 1e-6)
                    if result.report["threshold"] < float("inf") else None)
    if more is not None:
        more(output_set)
    result.report["outputs"] = {p.name: p.stat().st_size for p in sorted(output_set.staging.iterdir())}
    refuse_foreign(paths)  # again: a file may have appeared while the run worked
    atomic_write_bytes(output_set.stage(paths["report"]), (json.dumps(result.report, indent=2) + "\n").encode())
    # An uncertainty map from an earlier ensemble run being overwritten would not match the new set.
    output_set.commit(last=[paths["report"]],
                      obsolete=[paths["uncertainty"]] if result.uncertainty is None else [])


def _write_png_outputs(output_set, paths: dict, result, geometry, volume, notes) -> None:
    """A 2D image's outputs as PNG files a user can open: the segmentation 0/255, the counterfactual in the
    input's grey levels, the map as 16-bit grey (scale in the report) with its exact values in NRRD."""
    import numpy as np

    grey = volume.dtype if volume.dtype in (np.uint8, np.uint16) else np.dtype(np.uint16)
    top = np.iinfo(grey).max
    levels = np.rint(np.clip(result.anomaly_map / MAP_PNG_FULL_SCALE, 0.0, 1.0) * 65535).astype(np.uint16)
    write_volume(output_set.stage(paths["anomaly_seg"]), (result.segmentation > 0).astype(np.uint8) * 255,
                 geometry, notes)
    write_volume(output_set.stage(paths["anomaly_map"]), levels, geometry, notes)
    write_volume(output_set.stage(paths["anomaly_map_values"]), result.anomaly_map, geometry, notes)
    write_volume(output_set.stage(paths["counterfactual"]),
                 np.rint(np.clip(result.counterfactual, 0, top)).astype(grey), geometry, notes)
    result.report["png_outputs"] = {
        "anomaly_seg": "0 (normal) or 255 (anomalous)",
        "anomaly_map": f"16-bit: map value = grey level * {MAP_PNG_FULL_SCALE:g} / 65535; exact values in "
                       f"{paths['anomaly_map_values'].name}",
        "counterfactual": f"the input's grey levels ({grey.name})"}
