"""A detection's outputs: their names and format (the input's own, so that its geometry is kept), checks
before any work (a writable folder, nothing replaced without --overwrite), and the set written together."""
import json
import os
import tempfile
from pathlib import Path

from synomaly.errors import InputError, OutputError
from synomaly.files.overview import render_overview
from synomaly.files.volume_io import IMAGE_SUFFIXES, atomic_write_bytes, is_2d, write_volume

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


def case_name(path: Path) -> str:
    """Outputs are named after their input: ``/x/patient1.nii.gz`` -> ``patient1``; a DICOM folder -> its
    folder name (also for ``.``)."""
    name = path.name or path.resolve().name
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


def refuse_existing(paths) -> None:
    """Outputs are never replaced without --overwrite."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise OutputError(f"{existing[0]} already exists ({len(existing)} outputs in all); "
                          "use --overwrite to replace them, or another -o folder.")


def write_outputs(output_set, paths: dict, result, geometry, volume, ground_truth=None) -> None:
    """Write one case's outputs as a set (see ``output_set``): staged, then moved into place, the report
    last. Files already staged in ``output_set`` (the demo's inputs) are moved with them."""
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
