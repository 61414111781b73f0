"""``synomaly detect``: volumes, folders, globs or CSV lists in; per input, the anomaly segmentation, map,
counterfactual, report and overview out (a cohort run skips finished inputs and keeps a summary)."""
import os
import sys
from pathlib import Path
from typing import List

from synomaly.commands.formats import add_format_options, extra_writer, find_detect_inputs, item_paths
from synomaly.commands.options import KeepLines, detection_options, detection_settings
from synomaly.commands.terminal import Progress, error_line
from synomaly.errors import InputError, OutputError, SynomalyError
from synomaly.files.outputs import (FORMATS, check_output_format, check_writable, refuse_existing, refuse_foreign,
                                    refuse_inputs_as_outputs, write_outputs)

DETECT_EPILOG = """\
cohorts:
  An INPUT folder that holds DICOM files and no image files is one series. Any other
  folder is a cohort: every image file in it or below it is a volume, every folder
  below it holding DICOM files a series (each series an input where it holds several;
  NAME_seriesN); a file named *mask* is the mask of the image
  named before it (pat1_brainmask goes with pat1_flair), *seg*/*label*/*lesion* files
  are not inputs. An INPUT may also be a quoted glob ('scans/**/*.nii.gz') or a CSV
  list with the header image[,mask][,name] (paths relative to the CSV's folder).

  One volume named alone refuses existing outputs. Any other run skips the inputs
  whose NAME_report.json exists (--overwrite redoes them), so a killed job can be
  submitted again unchanged; a failing input is reported, the others go on, and the
  exit code is 2. Each run keeps summary.shard-K-of-N.csv (1-of-1 without --shard)
  and, at its end, rebuilds summary.csv (a row per input: status done/failed/pending,
  anomalous mL, components, max score, threshold, model id, seconds; the series UID of
  a DICOM folder's series) and failures.csv
  from every shard file in the folder, under a lock. Ctrl-C or SIGTERM (a scheduler's
  time limit) stops a run cleanly: exit 130, the input in progress leaves nothing.

  --shard K/N takes inputs K, K+N, K+2N, ... of the list, ordered by path below each
  INPUT (CSV: by row), the same on every machine. A Slurm job array of 8 tasks:
    #SBATCH --array=1-8
    synomaly detect /data/cohort -o /data/results --shard $SLURM_ARRAY_TASK_ID/8"""


def _threshold_line(model, settings, device) -> str:
    """The first line of a run: the model and the threshold this run actually uses."""
    from synomaly.inference.detection import DetectionSettings, inference_params

    if settings.threshold is not None:
        threshold = f"threshold {settings.threshold:.4f} (yours; the model's calibrated one is {model.threshold:.4f})"
    else:
        threshold = f"threshold {model.threshold:.4f} (the model's calibrated one)"
        model_blur = float(inference_params(model, DetectionSettings())["blur_mm"])
        if settings.blur_mm is not None and settings.blur_mm != model_blur:
            threshold += (f", calibrated for the model's {model_blur:g} mm blur: at {settings.blur_mm:g} mm expect "
                          f"{'more' if settings.blur_mm < model_blur else 'fewer'} false positives")
    return f"model: {model.name} ({model.model_id}), {threshold}, device {device}"


def run(args) -> int:
    from contextlib import ExitStack

    from synomaly.commands.cohort import (CohortLog, check_summary_files, find_inputs, merge_summary, parse_shard,
                                          sigterm_interrupts, summary_files, take_shard)
    from synomaly.files.model_file import load_model
    from synomaly.files.output_set import OutputFolder, OutputSet
    from synomaly.inference.detection import resolve_device

    shard = parse_shard(args.shard) if args.shard is not None else None
    found = find_detect_inputs(args, find_inputs)
    out_dir = Path(args.output)
    # A cohort (see ``cohort``): outputs that exist are skipped, not refused, and a summary is kept.
    cohort = found.cohort or shard is not None
    items = take_shard(found.items, *shard) if shard else found.items
    settings = detection_settings(args, batch_size=args.batch_size, seed=args.seed,
                                  skull_check=not args.no_skull_check, skull_strip=args.skull_strip,
                                  fit_check=not args.no_fit_check)
    sets = {item.name: item_paths(out_dir, item, args) for item in found.items}
    if cohort:
        sets["the summary"] = summary_files(out_dir, shard or (1, 1))
    refuse_inputs_as_outputs([p for item in found.items for p in (item.path, item.mask) if p is not None]
                             + found.lists, sets)
    all_paths = [sets[item.name] for item in items]
    check_writable(out_dir)
    failures = 0
    # The folder exists while the run holds its locks; if nothing was written it goes again.
    with sigterm_interrupts(), OutputFolder(out_dir), ExitStack() as held:
        if not cohort:  # one volume named alone: its outputs are refused, before any work
            single = held.enter_context(OutputSet(out_dir, items[0].name))
            refuse_foreign(all_paths[0])
            if not args.overwrite:
                refuse_existing(all_paths[0].values())
        else:
            check_summary_files(out_dir, shard or (1, 1))
        device = resolve_device(args.device)
        model = load_model(args.model, device=str(device))
        print(_threshold_line(model, settings, device), flush=True)
        if args.bids:
            from synomaly.commands.bids import write_dataset_description

            write_dataset_description(out_dir, Path(args.inputs[0]).expanduser(), model, args.overwrite)
        if cohort:
            book = held.enter_context(CohortLog(out_dir, items, shard or (1, 1)))
        for item, paths in zip(items, all_paths):
            output_set = None if cohort else single
            with ExitStack() as folders:  # the folders made for a set (BIDS sub-X/anat) go again if left empty
                try:
                    if cohort:
                        folder = folders.enter_context(OutputFolder(paths["report"].parent)).folder
                        output_set = OutputSet(folder, item.name).acquire()
                        refuse_foreign(paths)
                        if not args.overwrite and paths["report"].exists():
                            if book.existing(item, paths["report"]):
                                continue
                            raise OutputError(f"{paths['report']} cannot be read; use --overwrite to detect again.")
                    result = _detect_one(item, paths, model, settings, args, output_set)
                except (Exception if cohort else SynomalyError) as exc:  # in a cohort one input never stops the rest
                    message = str(exc) if isinstance(exc, SynomalyError) else f"{type(exc).__name__}: {exc}"
                    if not message.startswith(str(item.path)):
                        message = f"{item.path}: {message}"
                    print(error_line(message), file=sys.stderr)
                    failures += 1
                    if cohort:
                        book.failed(item, error_line(message)[len("synomaly: error: "):])
                    continue
                finally:
                    if output_set is not None:
                        output_set.release()
                _say_done(item, result.report, paths["report"].parent)
                if cohort:
                    book.done(item, result.report)
        if cohort:
            counts = merge_summary(out_dir)
            where = f"shard {shard[0]}/{shard[1]}" if shard else "this run"
            print(f"{where}: {len(items)} of {len(found.items)} inputs, {book.counts['done']} detected, "
                  f"{book.counts['skipped']} skipped (outputs exist; --overwrite redoes them), {failures} failed. "
                  f"{out_dir / 'summary.csv'}: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed "
                  f"(listed in failures.csv), {counts.get('pending', 0)} pending.")
    return 2 if failures else 0


def _detect_one(item, paths: dict, model, settings, args, output_set):
    """Read one input (and its mask), detect, and write its set of outputs; the result with its report."""
    from synomaly.files.geometry import grid_difference
    from synomaly.files.volume_io import read_volume
    from synomaly.inference.detection import detect

    path, mask_path = item.path, item.mask
    notes: List[str] = []
    volume, geometry = read_volume(path, notes, resample_gaps=args.resample_slice_gaps, series=item.series)
    check_output_format(path, paths, volume, geometry)
    mask = None
    if mask_path is not None:
        mask, mask_geometry = read_volume(mask_path, notes)
        difference = grid_difference(mask.shape, mask_geometry, volume.shape, geometry)
        if difference:
            raise InputError(f"{mask_path}: the mask does not lie on the input's voxel grid ({difference}); "
                             "resample the mask onto the input grid.")
    bar = Progress(path.name, enabled=not args.quiet)
    try:
        result = detect(volume, geometry, model, mask, settings, progress=bar)
    finally:
        bar.close()
    notes.extend(result.report.get("warnings", []))
    result.report = {"input": os.path.realpath(path), "series": item.series,
                     "mask": os.path.realpath(mask_path) if mask_path is not None else None,
                     **result.report, "warnings": notes}
    write_outputs(output_set, paths, result, geometry, volume,
                  more=extra_writer(item, paths, result, geometry, volume, args))
    for note in notes:
        print(f"synomaly: warning: {path}: {note}", file=sys.stderr)
    return result


def _say_done(item, r: dict, out_dir: Path) -> None:
    amount = (f"{r['anomalous_volume_ml']:.2f} mL" if "anomalous_area_px" not in r else
              f"{r['anomalous_area_mm2']:.1f} mm^2" if r["pixel_spacing_known"] else
              f"{r['anomalous_area_px']} pixels")
    print(f"{item.path}: {amount} anomalous in {r['n_components']} component(s), "
          f"max score {r['max_score']:.3f}{_fit_words(r.get('input_fit'))}; outputs in {out_dir}/{item.name}_*")


def _fit_words(fit) -> str:
    """The input-fit verdict for the result line, so that an unusual input is seen where the answer is."""
    if not fit or fit.get("score") is None:
        return "; input fit unknown (the model has no input reference)"
    return f"; input fit {fit['verdict']} (score {fit['score']:.1f})"


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="detect anomalies in volumes", description="Writes, per input NAME: "
                       "NAME_anomaly_seg, NAME_anomaly_map, NAME_counterfactual (volumes in the input's geometry), "
                       "NAME_report.json and NAME_overview.png. They appear together once NAME is done (an "
                       "interrupted run leaves none of them); a second run into the same folder at the same time "
                       "refuses. The brain model expects skull-stripped FLAIR: a whole head is refused unless a "
                       "brain mask is given (--mask, or --skull-strip hd-bet).")
    p.formatter_class, p.epilog = KeepLines, DETECT_EPILOG
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (NIfTI, NRRD, MHA, ...), DICOM folders, folders of them (searched below too), "
                        "quoted glob patterns, or CSV lists (image[,mask][,name]); see 'cohorts' below; 2D images (PNG, JPEG, a single-frame DICOM file) for a 2D "
                        "model (carotid-us)")
    p.add_argument("-o", "--output", default=None, help="output folder (default: current folder; with --bids "
                   "BIDS_ROOT/derivatives/synomaly)")
    p.add_argument("--mask", action="append", help="organ/foreground mask, one per input (default: found "
                   "automatically); for the brain model, a brain mask when the input is not skull-stripped; for "
                   "a carotid model, the vessel's lumen mask (required: the model looks at a disc around it)")
    p.add_argument("--skull-strip", choices=("hd-bet",), default=None, help="extract the brain with HD-BET "
                   "(pip install hd-bet) when no --mask is given")
    p.add_argument("--no-skull-check", action="store_true", help="do not refuse input that does not look "
                   "skull-stripped (brain model); for those who know better")
    p.add_argument("--no-fit-check", action="store_true", help="answer an input far from the volumes the model "
                   "was calibrated on (another sequence, units or organ) instead of refusing it; the report "
                   "still gives its fit score")
    detection_options(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per network call (default: 2 on CPU, 32 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--format", choices=["auto", *sorted(FORMATS)], default="auto",
                   help="volume output format (default auto: the input's own format, which keeps its geometry "
                        "exactly: nii.gz for NIfTI, nrrd for NRRD, mha for MetaImage; nrrd for DICOM; png for 2D PNG "
                        "and JPEG images: segmentation 0/255, counterfactual in the input's grey levels, map as 16-bit "
                        "grey (value = level * 2 / 65535) plus its exact values as NAME_anomaly_map.nrrd)")
    p.add_argument("--resample-slice-gaps", action="store_true",
                   help="a DICOM series with missing or unevenly spaced slices is refused; with this, it is "
                        "interpolated onto an even grid instead (the report says so; outputs are on that grid)")
    add_format_options(p)
    p.add_argument("--shard", metavar="K/N", default=None,
                   help="take the K-th of N shares of the inputs (K from 1 to N), for a job array: "
                        "--shard $SLURM_ARRAY_TASK_ID/N with --array=1-N")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (a cohort run otherwise "
                   "skips inputs whose outputs exist)")
    p.set_defaults(func=run)
