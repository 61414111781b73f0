"""The field's file conventions in ``synomaly detect``: which outputs beside the usual ones each input gets (DICOM
SEG and Parametric Maps for a DICOM series, a Slicer ``.seg.nrrd``), BIDS derivatives names for ``--bids``, and
the options that choose them; the files themselves are written in ``files/`` (``dicom_outputs``, ``slicer_seg``)
and ``commands/bids``."""
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Optional

from synomaly.commands.cohort import CohortInput, FoundInputs
from synomaly.errors import InputError
from synomaly.files.dicom_outputs import DICOM_KINDS, dicom_output_paths, parse_dicom_kinds
from synomaly.files.outputs import output_format, output_paths

SEG_FORMATS = ("auto", "seg.nrrd", "volume")


def add_format_options(p) -> None:
    p.add_argument("--series", metavar="UID", default=None,
                   help="the Series Instance UID to read from a DICOM folder of several series (a folder of "
                        "several series is refused with their list; in a cohort each series is one input)")
    p.add_argument("--dicom-outputs", metavar="KINDS", default=None,
                   help=f"for a DICOM input, DICOM outputs beside the others, a comma-separated list of "
                        f"{', '.join(DICOM_KINDS)} (default: seg; 'none' for none): the segmentation as a DICOM "
                        "SEG, the anomaly map and the counterfactual as Parametric Maps, each a new series of the "
                        "input's study, referencing its images")
    p.add_argument("--seg-format", choices=SEG_FORMATS, default="auto",
                   help="the segmentation also as a Slicer segmentation file NAME_anomaly_seg.seg.nrrd (segment "
                        "'Anomaly', colour and terminology in its header): auto (default) for NRRD inputs, seg.nrrd "
                        "for every input, volume for none")
    p.add_argument("--bids", action="store_true",
                   help="INPUT is the root of a BIDS dataset: detect in its FLAIR images (pybids) and write a BIDS "
                        "derivatives dataset (default -o: BIDS_ROOT/derivatives/synomaly)")
    p.add_argument("--bids-filter", metavar="JSON", default=None,
                   help="with --bids, BIDS entities that select the images, e.g. '{\"session\": \"01\"}'")


def find_detect_inputs(args, find_inputs) -> FoundInputs:
    """The inputs of a run: a BIDS dataset's FLAIR images (``--bids``), else ``find_inputs``'s, with
    ``--series`` for the one DICOM folder named alone. Options checked before any work."""
    asked_dicom = args.dicom_outputs is not None and bool(parse_dicom_kinds(args.dicom_outputs))
    if args.bids:
        if asked_dicom:
            raise InputError("--dicom-outputs goes with DICOM inputs; a BIDS dataset's images are NIfTI.")
        from synomaly.commands.bids import default_output, find_bids_inputs, parse_filter

        if args.series is not None:
            raise InputError("--series does not go with --bids.")
        if args.format not in ("auto", "nii.gz"):
            raise InputError(f"--format {args.format} does not go with --bids: BIDS derivatives are NIfTI (.nii.gz).")
        if args.output is None:
            args.output = str(default_output(Path(args.inputs[0]).expanduser()))
        return find_bids_inputs(args.inputs, args.mask, Path(args.output), parse_filter(args.bids_filter))
    if args.bids_filter is not None:
        raise InputError("--bids-filter goes with --bids.")
    if args.output is None:
        args.output = "."
    found = find_inputs(args.inputs, masks=args.mask, output=Path(args.output))
    if asked_dicom and not any(is_dicom_input(item.path) for item in found.items):
        raise InputError(f"--dicom-outputs goes with DICOM inputs (a DICOM folder or .dcm file), and none of the "
                         f"{len(found.items)} inputs is one; leave it out (the other outputs are written as ever).")
    alone = not found.cohort and Path(found.items[0].path).is_dir()
    if args.series is not None and not alone:
        raise InputError("--series goes with one DICOM folder named alone; in a folder of several series "
                         "each series is one input.")
    if alone:  # several series are listed, never guessed: before any work
        from synomaly.files.dicom_series import choose_series, list_series

        path = Path(found.items[0].path)
        uids = [uid for uid, _, _ in list_series(path)]
        if uids:
            found.items[0] = replace(found.items[0], series=choose_series(path, uids, args.series))
    return found


def is_dicom_input(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(".dcm")


def item_paths(out_dir: Path, item: CohortInput, args) -> Dict[str, Path]:
    """Every file one input's set may hold: the usual outputs (or their BIDS names), and the DICOM and Slicer
    files where they apply. Each is listed in the set's report, so that it is known as ours."""
    if args.bids:
        from synomaly.commands.bids import bids_output_paths

        return bids_output_paths(out_dir, Path(args.inputs[0]).expanduser(), item)
    fmt = output_format(Path(item.path), args.format)
    paths = output_paths(out_dir, item.name, fmt)
    if is_dicom_input(item.path) and fmt != "png":
        paths.update(dicom_output_paths(out_dir, item.name, parse_dicom_kinds(args.dicom_outputs)))
    if args.seg_format == "seg.nrrd" or (args.seg_format == "auto" and fmt == "nrrd" and
                                         Path(item.path).name.lower().endswith((".nrrd", ".nhdr"))):
        paths["slicer_seg"] = out_dir / f"{item.name}_anomaly_seg.seg.nrrd"
    return paths


def extra_writer(item: CohortInput, paths: Dict[str, Path], result, geometry, volume, args
                 ) -> Optional[Callable]:
    """What writes the files beyond the usual outputs into an output set (``write_outputs(more=...)``)."""
    jobs = []
    if "slicer_seg" in paths:
        from synomaly.files.slicer_seg import write_slicer_seg

        jobs.append(lambda out: write_slicer_seg(out.stage(paths["slicer_seg"]), result.segmentation, geometry,
                                                 result.report.setdefault("warnings", [])))
    if any(k.startswith("dicom_") for k in paths):
        jobs.append(lambda out: _write_dicom(out, item, paths, result, volume, geometry))
    if args.bids:
        from synomaly.commands.bids import write_sidecars

        root = Path(args.inputs[0]).expanduser()
        jobs.append(lambda out: write_sidecars(out, paths, root, item, result))
    return (lambda out: [job(out) for job in jobs]) if jobs else None


def _write_dicom(output_set, item: CohortInput, paths, result, volume, geometry) -> None:
    """The DICOM objects, where the volume's slices are the series' images one by one (a series whose gaps were
    resampled has no source image for some slices: the report says why they are left out)."""
    from synomaly.files.dicom_outputs import series_sources, sources_problem, write_dicom_outputs

    try:
        import highdicom  # noqa: F401  (a dependency of the engine; an environment may still lack it)
    except ImportError:
        result.report.setdefault("warnings", []).append("no DICOM outputs: highdicom is not installed "
                                                        "(pip install highdicom); the other outputs are written")
        return
    folder = Path(item.path)
    sources = (series_sources(folder, item.series) if folder.is_dir() else [_header(folder)])
    problem = sources_problem(sources, volume.shape, geometry)
    dicom = {k: v for k, v in paths.items() if k.startswith("dicom_")}
    if problem is None:
        try:
            write_dicom_outputs(output_set, dicom, sources, result)
            return
        except (ValueError, AttributeError, TypeError) as exc:  # highdicom's checks of the source images: a
            # value it refuses (ValueError), or an attribute the images lack (SliceThickness of a single frame)
            detail = f"it lacks {exc.args[0].split()[-1]}" if isinstance(exc, AttributeError) and exc.args else exc
            problem = f"highdicom cannot derive from the series ({detail})"
            for path in dicom.values():
                output_set.stage(path).unlink(missing_ok=True)
    result.report.setdefault("warnings", []).append(f"no DICOM outputs: {problem}; the other outputs are written")


def _header(path: Path):
    import pydicom

    return pydicom.dcmread(str(path), stop_before_pixels=True)
