"""The ``synomaly`` command: detect, train, evaluate, demo. The same engine calls as in Slicer."""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from .errors import InputError, OutputError, SynomalyError

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


def error_line(message: str) -> str:
    """The documented one-line error, even when a library's message spans several lines."""
    return "synomaly: error: " + " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def case_name(path: Path) -> str:
    """``/x/patient1.nii.gz`` -> ``patient1``; a DICOM folder -> its folder name (also for ``.``)."""
    name = path.name or path.resolve().name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


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

    from .volume_io import is_2d

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


def _bar_disabled(enabled: bool):
    """Bars only on a terminal (tqdm's ``None``): logs and captured output get no carriage-return noise."""
    return True if not enabled else None


class Progress:
    """A tqdm bar fed by the engine's progress(fraction, message) callback: percentage, elapsed time,
    time left at the average rate so far, and the engine's message. It never moves backwards."""

    def __init__(self, desc: str, enabled: bool = True):
        from tqdm import tqdm

        # tqdm puts ", " before a non-empty postfix: here it separates the time from the message.
        self.bar = tqdm(total=1000, desc=desc, disable=_bar_disabled(enabled), leave=False, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def __call__(self, fraction: float, message: str) -> None:
        self.bar.n = max(self.bar.n, int(1000 * min(1.0, max(0.0, fraction))))
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def write_outputs(output_set, paths: dict, result, geometry, volume, ground_truth=None) -> None:
    """Write one case's outputs as a set (see ``output_set``): staged, then moved into place, the report
    last. Files already staged in ``output_set`` (the demo's inputs) are moved with them."""
    from .overview import render_overview
    from .volume_io import atomic_write_bytes, write_volume

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

    from .volume_io import write_volume

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


def _threshold_line(model, settings, device) -> str:
    """The first line of a run: the model and the threshold this run actually uses."""
    from .detection import DetectionSettings, inference_params

    if settings.threshold is not None:
        threshold = f"threshold {settings.threshold:.4f} (yours; the model's calibrated one is {model.threshold:.4f})"
    else:
        threshold = f"threshold {model.threshold:.4f} (the model's calibrated one)"
        model_blur = float(inference_params(model, DetectionSettings())["blur_mm"])
        if settings.blur_mm is not None and settings.blur_mm != model_blur:
            threshold += (f", calibrated for the model's {model_blur:g} mm blur: at {settings.blur_mm:g} mm expect "
                          f"{'more' if settings.blur_mm < model_blur else 'fewer'} false positives")
    return f"model: {model.name} ({model.model_id}), {threshold}, device {device}"


def cmd_detect(args) -> int:
    from contextlib import ExitStack

    from .cohort import CohortLog, find_inputs, merge_summary, parse_shard, sigterm_interrupts, take_shard
    from .detection import detect, resolve_device
    from .model_file import load_model
    from .output_set import OutputFolder, OutputSet
    from .volume_io import read_volume

    out_dir = Path(args.output)
    shard = parse_shard(args.shard) if args.shard is not None else None
    found = find_inputs(args.inputs, masks=args.mask, output=out_dir)
    # A cohort (see ``cohort``): outputs that exist are skipped, not refused, and a summary is kept.
    cohort = found.cohort or shard is not None
    items = take_shard(found.items, *shard) if shard else found.items
    settings = _detection_settings(args, batch_size=args.batch_size, seed=args.seed,
                                   skull_check=not args.no_skull_check, skull_strip=args.skull_strip)
    all_paths = [output_paths(out_dir, item.name, output_format(item.path, args.format)) for item in items]
    check_writable(out_dir)
    failures = 0
    # The folder exists while the run holds its locks; if nothing was written it goes again.
    with sigterm_interrupts(), OutputFolder(out_dir), ExitStack() as held:
        if not cohort:  # one volume named alone: its outputs are refused, before any work
            single = held.enter_context(OutputSet(out_dir, items[0].name))
            if not args.overwrite:
                refuse_existing(all_paths[0].values())
        device = resolve_device(args.device)
        model = load_model(args.model, device=str(device))
        print(_threshold_line(model, settings, device), flush=True)
        if cohort:
            book = held.enter_context(CohortLog(out_dir, items, shard or (1, 1)))
        for item, paths in zip(items, all_paths):
            path, mask_path = item.path, item.mask
            output_set = None if cohort else single
            try:
                if cohort:
                    output_set = OutputSet(out_dir, item.name).acquire()
                    if not args.overwrite and paths["report"].exists():
                        if book.existing(item, paths["report"]):
                            continue
                        raise OutputError(f"{paths['report']} cannot be read; use --overwrite to detect again.")
                notes: List[str] = []
                volume, geometry = read_volume(path, notes, resample_gaps=args.resample_slice_gaps)
                check_output_format(path, paths, volume, geometry)
                mask = None
                if mask_path is not None:
                    mask, _ = read_volume(mask_path, notes)
                    if mask.shape != volume.shape:
                        raise InputError(f"{mask_path}: size {tuple(reversed(mask.shape))} differs from the input's "
                                         f"{tuple(reversed(volume.shape))}; resample the mask onto the input grid.")
                bar = Progress(path.name, enabled=not args.quiet)
                try:
                    result = detect(volume, geometry, model, mask, settings, progress=bar)
                finally:
                    bar.close()
                result.report = {"input": str(path.resolve()),
                                 "mask": str(mask_path.resolve()) if mask_path is not None else None,
                                 **result.report, "warnings": notes}
                write_outputs(output_set, paths, result, geometry, volume)
            except (Exception if cohort else SynomalyError) as exc:  # in a cohort one input never stops the rest
                message = str(exc) if isinstance(exc, SynomalyError) else f"{type(exc).__name__}: {exc}"
                if not message.startswith(str(path)):
                    message = f"{path}: {message}"
                print(error_line(message), file=sys.stderr)
                failures += 1
                if cohort:
                    book.failed(item, error_line(message)[len("synomaly: error: "):])
                continue
            finally:
                if output_set is not None:
                    output_set.release()
            for note in notes:
                print(f"synomaly: warning: {path}: {note}", file=sys.stderr)
            r = result.report
            amount = (f"{r['anomalous_volume_ml']:.2f} mL" if "anomalous_area_px" not in r else
                      f"{r['anomalous_area_mm2']:.1f} mm^2" if r["pixel_spacing_known"] else
                      f"{r['anomalous_area_px']} pixels")
            print(f"{path}: {amount} anomalous in {r['n_components']} component(s), "
                  f"max score {r['max_score']:.3f}; outputs in {out_dir}/{item.name}_*")
            if cohort:
                book.done(item, r)
        if cohort:
            counts = merge_summary(out_dir)
            where = f"shard {shard[0]}/{shard[1]}" if shard else "this run"
            print(f"{where}: {len(items)} of {len(found.items)} inputs, {book.counts['done']} detected, "
                  f"{book.counts['skipped']} skipped (outputs exist; --overwrite redoes them), {failures} failed. "
                  f"{out_dir / 'summary.csv'}: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed "
                  f"(listed in failures.csv), {counts.get('pending', 0)} pending.")
    return 2 if failures else 0


def cmd_train(args) -> int:
    from tqdm import tqdm

    from .distributed import PeerFailed, Team
    from .errors import Cancelled
    from .training import TrainingSettings, train

    output = Path(args.output).expanduser()
    settings = TrainingSettings(preset=args.preset, noise=args.noise, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, image_size=args.image_size, base_channels=args.base_channels,
                                num_res_blocks=args.res_blocks, device=args.device, seed=args.seed,
                                name=args.name or "", checkpoint_every=args.checkpoint_every,
                                target_fpr=args.target_fpr, lesion_slices=args.lesion_slices,
                                lesion_margin_mm=args.lesion_margin_mm, precision=args.precision,
                                min_slice_foreground=args.min_slice_foreground, context_slices=args.context_slices,
                                compile=args.compile)
    team = Team.from_environment()
    if args.nproc is not None:
        if team.distributed:
            raise InputError("this process is already one of several started by torchrun; leave out --nproc.")
        if args.nproc < 1:
            raise InputError(f"--nproc must be a whole number of at least 1, got {args.nproc}.")
        if args.nproc > 1:
            if settings.compile:
                from .training import COMPILE_ALONE

                raise InputError(COMPILE_ALONE)
            return launch_training(args, settings)
    check_writable(output.parent)
    quiet = args.quiet or not team.main  # in a team, process 0 speaks for all
    # A bar on a terminal; in a log (stderr not a terminal) a line for the long stages, the first step and
    # each checkpoint.
    log = not quiet and not sys.stderr.isatty()
    bar = tqdm(total=settings.steps, desc="training", disable=_bar_disabled(not quiet), file=sys.stderr)
    logged = []

    def progress(step, total, loss, message):
        bar.n = step
        if step % 10 == 0 or not message.startswith("step"):  # the loss every 10 steps; stage names always
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        saved = step % settings.checkpoint_every == 0
        if log and message.startswith("step") and (saved or not logged):
            logged.append(step)
            print(f"training: step {step}/{total}, loss {loss:.4f}{', checkpoint saved' if saved else ''}",
                  file=sys.stderr, flush=True)
        elif log and not message.startswith(("step", "extracting")):  # the long stages (compiling,
            # calibrating), so a log says what a pause is; not the data's reading, whose refusals stay one line
            print(f"training: {message}", file=sys.stderr, flush=True)

    try:
        with StopRequests(keep=team.distributed) as stop:
            try:
                train(args.healthy, output, settings, progress=progress, cancel=stop.is_set, resume=args.resume,
                      overwrite=args.overwrite)
            except Cancelled as exc:
                bar.close()
                if team.main:  # said while stop requests are still caught, so that a launcher cannot cut it short
                    again = "with --resume instead of --overwrite" if args.overwrite else "with --resume"
                    print(f"synomaly: {exc}; run the same command {again} to continue.", file=sys.stderr)
                return 130
            except PeerFailed:
                return 2  # the process that failed has said why
    finally:
        bar.close()
    if not team.main:
        return 0
    from .model_file import read_metadata

    meta = read_metadata(output)
    print(f"model written to {output} (id {meta['model_id']}, calibrated threshold {meta['threshold']:.4f} "
          f"at {meta['calibration']['target_fpr']:.1%} healthy false positives)")
    return 0


def launch_training(args, settings) -> int:
    """``train --nproc N``: check the run here (one clear line for a bad setting, not one per process),
    then train in N processes started as torchrun starts them."""
    from .distributed import check_share, launch
    from .training import check_run

    output = check_run(args.output, settings, args.resume, args.overwrite)
    check_share(args.nproc, settings.batch_size)
    check_writable(output.parent)
    argv = ["train"]
    for action in args.train_parser._actions:  # the same options, so that every process trains alike
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "nproc") or value is None or value is False:
            continue
        if not action.option_strings:
            argv += [str(v) for v in value]
        elif action.nargs == 0:
            argv.append(action.option_strings[-1])
        else:
            argv.append(f"{action.option_strings[-1]}={value}")
    return launch(args.nproc, argv)


class StopRequests:
    """While active, Ctrl-C (SIGINT) and SIGTERM set ``self`` (an event: ``is_set()``) instead of stopping
    the process, so training saves a checkpoint and stops cleanly; a second signal acts as usual, unless
    ``keep``: a process of a torchrun team may get a signal from its launcher after one from a scheduler,
    and its launcher kills it when it does not stop in time."""

    def __init__(self, keep: bool = False):
        import threading

        self._event = threading.Event()
        self.is_set = self._event.is_set
        self._keep = keep
        self._previous = {}

    def _handler(self, signum, frame):
        self._event.set()
        if not self._keep:
            self._restore()

    def _restore(self):
        import signal

        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # only there may handlers be set
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


TRAIN_DESCRIPTION = """\
Trains a model on healthy volumes (or partly healthy ones: labelled slices are left out).

HEALTHY may be:
  - a folder of image files, each one a case (pat1_flair.nii.gz, pat2_flair.nii.gz, ...);
  - a case folder: one image plus optional mask and label files, named freely
    (flair.nii.gz, brainmask.nii.gz, seg.nii.gz);
  - a folder of case folders;
  - image files listed one by one;
  - a CSV file with the header image[,mask][,label][,name][,group]; relative paths
    are relative to the CSV's folder. group names the acquisition or patient of a 2D
    image: validation holds out whole groups.
2D images (PNG, JPEG; a single-frame DICOM file in a CSV) train a 2D preset
(carotid-us), whose mask is the vessel's lumen mask (required); the 3D presets refuse them.
A file whose name holds 'mask' is a foreground mask, one holding 'seg', 'label' or
'lesion' a lesion label, any other an image. Beside several images, a mask or label
belongs to the image whose name starts with the words before its role word:
pat1_brainmask and pat1_seg belong to pat1_flair (not to pat10_flair). A mask or
label that fits no image or several, and an image with two masks, are refused.

Checkpoints go to MODEL.run/ every --checkpoint-every steps, and when Ctrl-C or
SIGTERM stops the run (exit code 130); --resume continues from there. Without a
terminal (a log file), a line for the first step and one per checkpoint replace the
progress bar.

Several processes: --nproc N, or torchrun --nproc_per_node N -m synomaly train ...,
trains with DistributedDataParallel, one process per GPU (NCCL) or CPU share (gloo).
Each process trains on its share of every batch (--batch-size is the whole batch),
so the loss curve is that of one process up to rounding; process 0 writes the run
folder and the model. A run may resume with another process count."""


def cmd_evaluate(args) -> int:
    from .evaluation import _unique_names, cases_from_list, evaluate, find_eval_cases, format_table
    from .model_file import load_model

    settings = _detection_settings(args)
    if not args.cases and not args.cases_csv:
        raise InputError("give the cases to evaluate: case folders, CSV lists, or --cases-csv LIST.")
    cases = find_eval_cases(args.cases) if args.cases else []
    if args.cases_csv:
        cases = _unique_names(cases + cases_from_list(args.cases_csv, args.use))
    out_dir = Path(args.output)
    check_writable(out_dir)
    model = load_model(args.model)
    bar = Progress("evaluating", enabled=not args.quiet)
    try:
        summary = evaluate(cases, model, settings, out_dir, target_fpr=args.target_fpr, progress=bar,
                           max_slices=args.max_slices)
    finally:
        bar.close()
    print(format_table(summary))
    print(f"details in {out_dir}/evaluation.json, evaluation.md and *_panel.png")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), device=args.device, overwrite=args.overwrite, quiet=args.quiet)
    return 0


DETECT_EPILOG = """\
cohorts:
  An INPUT folder that holds DICOM files and no image files is one series. Any other
  folder is a cohort: every image file in it or below it is a volume, every folder
  below it holding DICOM files a series; a file named *mask* is the mask of the image
  named before it (pat1_brainmask goes with pat1_flair), *seg*/*label*/*lesion* files
  are not inputs. An INPUT may also be a quoted glob ('scans/**/*.nii.gz') or a CSV
  list with the header image[,mask][,name] (paths relative to the CSV's folder).

  One volume named alone refuses existing outputs. Any other run skips the inputs
  whose NAME_report.json exists (--overwrite redoes them), so a killed job can be
  submitted again unchanged; a failing input is reported, the others go on, and the
  exit code is 2. Each run keeps summary.shard-K-of-N.csv (1-of-1 without --shard)
  and, at its end, rebuilds summary.csv (a row per input: status done/failed/pending,
  anomalous mL, components, max score, threshold, model id, seconds) and failures.csv
  from every shard file in the folder, under a lock. Ctrl-C or SIGTERM (a scheduler's
  time limit) stops a run cleanly: exit 130, the input in progress leaves nothing.

  --shard K/N takes inputs K, K+N, K+2N, ... of the list, ordered by path below each
  INPUT (CSV: by row), the same on every machine. A Slurm job array of 8 tasks:
    #SBATCH --array=1-8
    synomaly detect /data/cohort -o /data/results --shard $SLURM_ARRAY_TASK_ID/8"""


class _KeepLines(argparse.HelpFormatter):
    """Fills a one-line text to the terminal's width; keeps a text written in lines as it is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _detection_settings(args, **more):
    """The DetectionSettings of ``_detection_options`` (shared by detect and evaluate), with a command's own."""
    from .detection import DetectionSettings

    return DetectionSettings(device=args.device, stages=args.stages, noise_level=args.noise_level,
                             threshold=args.threshold, ensemble=args.ensemble, mode=args.mode,
                             precision=args.precision, min_component_mm3=args.min_component_mm3,
                             blur_mm=args.blur_mm, **more)


def _detection_options(p):
    p.add_argument("--model", default=None, help="bundled model name or path to a .safetensors file "
                                                 "(default: the bundled brain FLAIR model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--stages", type=int, default=None, help="maximum number of stages (default: the model's)")
    p.add_argument("--noise-level", type=int, default=None, help="diffusion step t of the noise (default: the model's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="anomaly-map threshold (default: the model's calibrated one)")
    p.add_argument("--ensemble", type=int, default=None,
                   help="noise draws to average (default: the model's); >1 also writes an uncertainty map")
    p.add_argument("--mode", choices=("multi", "single"), default=None, help="multi-stage (default) or single-stage")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="network precision: auto (default) = bf16 on CPUs with native bf16 (AVX512-BF16, AMX), "
                        "fp32 elsewhere, CUDA included (bf16 measured no faster there)")
    p.add_argument("--min-component-mm3", type=float, default=None, help="drop smaller components (default: the model's)")
    p.add_argument("--blur-mm", type=float, default=None, help="Gaussian sigma of the anomaly map in mm (default: the "
                   "model's); less keeps lesions of a few mm, with more false positives (see the model card)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="synomaly", description="Unsupervised anomaly detection in medical "
                                     "volumes with Synomaly noise and multi-stage diffusion.")
    parser.add_argument("--version", action="version", version=f"synomaly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("detect", help="detect anomalies in volumes", description="Writes, per input NAME: "
                       "NAME_anomaly_seg, NAME_anomaly_map, NAME_counterfactual (volumes in the input's geometry), "
                       "NAME_report.json and NAME_overview.png. They appear together once NAME is done (an "
                       "interrupted run leaves none of them); a second run into the same folder at the same time "
                       "refuses. The brain model expects skull-stripped FLAIR: a whole head is refused unless a "
                       "brain mask is given (--mask, or --skull-strip hd-bet).")
    p.formatter_class, p.epilog = _KeepLines, DETECT_EPILOG
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (NIfTI, NRRD, MHA, ...), DICOM folders, folders of them (searched below too), "
                        "quoted glob patterns, or CSV lists (image[,mask][,name]); see 'cohorts' below; 2D images (PNG, JPEG, a single-frame DICOM file) for a 2D "
                        "model (carotid-us)")
    p.add_argument("-o", "--output", default=".", help="output folder (default: current folder)")
    p.add_argument("--mask", action="append", help="organ/foreground mask, one per input (default: found "
                   "automatically); for the brain model, a brain mask when the input is not skull-stripped; for "
                   "a carotid model, the vessel's lumen mask (required: the model looks at a disc around it)")
    p.add_argument("--skull-strip", choices=("hd-bet",), default=None, help="extract the brain with HD-BET "
                   "(pip install hd-bet) when no --mask is given")
    p.add_argument("--no-skull-check", action="store_true", help="do not refuse input that does not look "
                   "skull-stripped (brain model); for those who know better")
    _detection_options(p)
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
    p.add_argument("--shard", metavar="K/N", default=None,
                   help="take the K-th of N shares of the inputs (K from 1 to N), for a job array: "
                        "--shard $SLURM_ARRAY_TASK_ID/N with --array=1-N")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (a cohort run otherwise "
                   "skips inputs whose outputs exist)")
    p.set_defaults(func=cmd_detect)

    from .presets import PRESETS

    p = sub.add_parser("train", help="train a model on healthy volumes", description=TRAIN_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("healthy", nargs="+", metavar="HEALTHY",
                   help="image files, folders of image files, folders of case folders, or CSV lists")
    p.add_argument("-o", "--output", required=True, metavar="MODEL",
                   help="model file to write (.safetensors); missing folders are created")
    p.add_argument("--preset", choices=sorted(PRESETS), default="brain-flair", help="noise and intensity preset")
    p.add_argument("--noise", choices=("synomaly", "gaussian", "simplex", "coarse", "pyramid"), default="synomaly")
    p.add_argument("--steps", type=int, default=2000, help="training steps, at least 1 (default: 2000)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per step, at least 1 (default: 8)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate, above 0 (default: 2e-4)")
    p.add_argument("--image-size", type=int, default=128,
                   help="network input size in pixels, a multiple of 8 (default: 128)")
    p.add_argument("--base-channels", type=int, default=32,
                   help="network width: 8, 16 or a multiple of 32 (default: 32)")
    p.add_argument("--res-blocks", type=int, default=1, help="residual blocks per level (default: 1)")
    p.add_argument("--context-slices", type=int, default=0,
                   help="2.5D: neighbouring slices each side the network also sees, as channels (default: 0, 2D)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="steps between checkpoints (default: 100); Ctrl-C also saves one")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="healthy false-positive rate for calibration, between 0 and 1 (default: 0.01)")
    p.add_argument("--lesion-slices", choices=("skip", "mask"), default="skip",
                   help="slices with labelled lesions: skip them (default), or train on them with the lesion, "
                        "grown by --lesion-margin-mm, left out of the loss and of the synthetic anomalies")
    p.add_argument("--lesion-margin-mm", type=float, default=5.0,
                   help="how far around a labelled lesion is left out with --lesion-slices mask (default: 5)")
    p.add_argument("--min-slice-foreground", type=float, default=0.05,
                   help="train on slices whose foreground covers at least this share of the slice (default: 0.05)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where it was measured faster (CPUs with native bf16; CUDA "
                        "with --compile or from 256 slices per step), fp32 elsewhere; or force either")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network first (a minute or two): on a GPU the training step runs up "
                        "to about 1.7x faster; no gain on a CPU")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="model name (default: the file name)")
    p.add_argument("--resume", action="store_true",
                   help="continue from MODEL.run/checkpoint.pt; --steps, --target-fpr, --checkpoint-every, "
                        "--device and --name may differ from the saved run, the other settings may not")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: replace an existing model file and its run folder MODEL.run/")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine, one per GPU (or CPU share), each on its share of "
                        "every batch (torchrun --standalone --nproc_per_node N); the batch size stays the whole "
                        "batch, and must be at least N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=cmd_train, train_parser=p)

    p = sub.add_parser("evaluate", help="evaluate against ground truth, next to the intensity baseline",
                       description="Cases: folders (image + *seg*/*label* [+ *mask*]), folders of such folders, "
                       "or a CSV with columns image,label[,mask][,name].")
    p.add_argument("cases", nargs="*", metavar="CASES")
    p.add_argument("--cases-csv", default=None, metavar="LIST",
                   help="a case list with columns case,folder,use (as ../shared/data/cases.csv): its cases "
                        "whose use is --use, each folder a case folder relative to the list")
    p.add_argument("--use", default="development", help="which use of --cases-csv to evaluate (default: development)")
    p.add_argument("-o", "--output", default="evaluation", help="output folder")
    _detection_options(p)
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--max-slices", type=int, default=None, help="evaluate at most this many slices per case "
                   "(around the lesion; for quick checks)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="run the whole pipeline on a generated phantom",
                       description="Generates a phantom with a known lesion, detects it with the bundled demo "
                       "model, writes the outputs and prints the Dice.")
    p.add_argument("-o", "--output", default="synomaly_demo", help="output folder (default: ./synomaly_demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _log_as_warnings() -> None:
    """The engine's logged warnings (a library's message, a cleaned-up interrupted run) in our format."""
    import logging

    logger = logging.getLogger("synomaly")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("synomaly: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _log_as_warnings()
    try:
        return args.func(args)
    except SynomalyError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synomaly: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
