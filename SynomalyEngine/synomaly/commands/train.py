"""``synomaly train``: healthy cases in, a calibrated model file out; resumable, in one process or several."""
import argparse
import sys
from pathlib import Path

from synomaly.commands.terminal import bar_disabled
from synomaly.errors import InputError
from synomaly.files.outputs import check_writable


def run(args) -> int:
    from tqdm import tqdm

    from synomaly.errors import Cancelled
    from synomaly.training.distributed import PeerFailed, Team
    from synomaly.training.loop import train
    from synomaly.training.settings import TrainingSettings

    output = Path(args.output).expanduser()
    settings = TrainingSettings(preset=args.preset, noise=args.noise, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, image_size=args.image_size, base_channels=args.base_channels,
                                num_res_blocks=args.res_blocks, device=args.device, seed=args.seed,
                                name=args.name or "", checkpoint_every=args.checkpoint_every,
                                target_fpr=args.target_fpr, lesion_slices=args.lesion_slices,
                                lesion_margin_mm=args.lesion_margin_mm, intensity_shift=args.intensity_shift,
                                bias_field=args.bias_field, precision=args.precision,
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
                from synomaly.training.loop import COMPILE_ALONE

                raise InputError(COMPILE_ALONE)
            return launch_training(args, settings)
    check_writable(output.parent)
    quiet = args.quiet or not team.main  # in a team, process 0 speaks for all
    # A bar on a terminal; in a log (stderr not a terminal) a line for the long stages, the first step and
    # each checkpoint.
    log = not quiet and not sys.stderr.isatty()
    bar = tqdm(total=settings.steps, desc="training", disable=bar_disabled(not quiet), file=sys.stderr)
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
    from synomaly.files.model_file import read_metadata

    meta = read_metadata(output)
    print(f"model written to {output} (id {meta['model_id']}, calibrated threshold {meta['threshold']:.4f} "
          f"at {meta['calibration']['target_fpr']:.1%} healthy false positives)")
    return 0


def launch_training(args, settings) -> int:
    """``train --nproc N``: check the run here (one clear line for a bad setting, not one per process),
    then train in N processes started as torchrun starts them."""
    from synomaly.training.checkpoints import check_run
    from synomaly.training.distributed import check_share, launch

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
    return launch(args.nproc, argv, args.threads)


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


def add_parser(sub) -> None:
    from synomaly.method.presets import PRESETS

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
    p.add_argument("--intensity-shift", type=float, default=0.0,
                   help="shift each training slice's level inside the mask by up to this share of the intensity "
                        "window each way: another contrast phase (liver-ct v2: 0.2, +-30 HU; default: 0)")
    p.add_argument("--bias-field", type=float, default=0.0,
                   help="multiply half of the training slices by a random smooth field exp(s * f), s up to this, "
                        "|f| <= 1: robustness to MRI bias fields that N4 was not run on (e.g. 0.6; default: 0)")
    p.add_argument("--min-slice-foreground", type=float, default=0.05,
                   help="train on slices whose foreground covers at least this share of the slice (default: 0.05)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 autocast where it was measured faster (CPUs with native bf16; CUDA "
                        "with --compile or from 256 slices per step), fp32 elsewhere; or force either")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network first (a minute or two): on a GPU the training step runs up "
                        "to about 1.7x faster; no gain on a CPU")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU), cpu, cuda or mps (Apple GPU: one process, fp32)")
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
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: the CPUs this "
                   "process may use, at most SLURM_CPUS_PER_TASK or OMP_NUM_THREADS; with --nproc, shared "
                   "out evenly among the processes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=run, train_parser=p)
