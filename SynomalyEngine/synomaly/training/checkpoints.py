"""A run's saved state in ``<model>.run/checkpoint.pt``: written atomically, read back only after checking
that it is ours and that the settings given may continue it (loaded without running code)."""
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict

from synomaly.errors import InputError, OutputError
from synomaly.files.library_messages import last_line
from synomaly.training.settings import TrainingSettings


def save_atomic_torch(obj, path: Path) -> None:
    """Write a checkpoint beside ``path`` and rename it into place; one that cannot be written (a full disk, a
    file-size limit) is an OutputError naming the last checkpoint that stands, never a traceback."""
    import torch

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer raises RuntimeError for a failed write
        standing = f"the last checkpoint written ({path}) stands" if path.exists() else "no checkpoint was kept"
        raise OutputError(f"{path}: the checkpoint cannot be written ({last_line(exc)}): the disk may be full or a "
                          f"file-size limit reached; {standing}: make room and continue with --resume.") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_leftovers(run_dir: Path) -> None:
    """Half-written checkpoints of a run killed while saving (our own ``.tmp-*.pt``): never resumable."""
    for leftover in run_dir.glob(".tmp-*.pt"):
        leftover.unlink(missing_ok=True)


def run_dir_for(output: Path) -> Path:
    return output.with_name(output.name.split(".")[0] + ".run")


# Settings a resumed run may change: they do not alter the network or what it has learnt so far.
RESUMABLE_CHANGES = ("steps", "target_fpr", "checkpoint_every", "preview_every", "device", "name", "description",
                     "inference", "precision", "compile")
CHECKPOINT_KEYS = ("network", "ema", "optimizer", "generator", "step", "losses", "elapsed_s", "settings")


def read_checkpoint(path: Path, settings: TrainingSettings, device) -> Dict:
    """The saved state of a run, after checking it is ours and that ``settings`` may continue it.

    Loaded with ``weights_only=True`` (no code runs); anything unreadable or foreign is an InputError."""
    import torch

    fresh = "start afresh with --overwrite"
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # torch raises many kinds (pickle, zip, EOF, runtime), with long texts, for a damaged file
        raise InputError(f"{path}: not a readable training checkpoint (damaged, or not written by synomaly); "
                         f"{fresh}.") from None
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS) \
            or not isinstance(state["settings"], dict) or isinstance(state["step"], bool) \
            or not isinstance(state["step"], int) or not isinstance(state["losses"], list) \
            or not 0 <= state["step"] == len(state["losses"]):
        raise InputError(f"{path}: not a Synomaly training checkpoint; {fresh}.")
    now = settings.to_dict()
    # A setting the saved run does not name came after the engine that wrote it: that run had its default.
    saved = {**TrainingSettings().to_dict(), **state["settings"]}
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise InputError("cannot resume: " + ", ".join(f"{k} (saved {saved.get(k)!r}, now {now.get(k)!r})"
                                                       for k in changed)
                         + f" differ from the saved run, and only {', '.join(RESUMABLE_CHANGES)} may change; "
                         f"resume with the saved values, or {fresh}.")
    if settings.steps < state["step"]:
        raise InputError(f"cannot resume: the saved run is at step {state['step']}, beyond the {settings.steps} "
                         f"steps asked for; give at least {state['step']} steps.")
    return state


def check_run(output, settings: TrainingSettings, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse settings, and a model file or run folder, that ``train`` would refuse; return the model path.

    Instant (no data read, nothing written), so that a launcher can check a run before starting it."""
    settings.validate()
    output = Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise OutputError(f"{output}: model files end in .safetensors.")
    if resume and overwrite:
        raise InputError("resume continues the saved run and overwrite starts afresh; choose one.")
    run_dir = run_dir_for(output)
    checkpoint_path = run_dir / "checkpoint.pt"
    for path in (output, run_dir):
        if path.exists() and path.is_dir() != (path == run_dir):
            raise OutputError(f"{path} is in the way ({'not a folder' if path == run_dir else 'a folder'}); "
                              "move it or choose another model file.")
    leftovers = output.exists() or (run_dir.exists() and any(run_dir.iterdir()))
    if not (resume or overwrite):
        if output.exists():
            raise OutputError(f"{output} already exists; continue its run (--resume), replace it (--overwrite) "
                              "or choose another model file.")
        if checkpoint_path.exists():
            raise OutputError(f"{run_dir} holds an earlier run; continue it (--resume) or start afresh "
                              "(--overwrite).")
        if leftovers:
            raise OutputError(f"{run_dir} holds files of an earlier run that has no checkpoint; start afresh "
                              "(--overwrite) or choose another model file.")
    if resume and not checkpoint_path.is_file():
        how = "start afresh with --overwrite instead of --resume" if leftovers else "start a new run without --resume"
        raise OutputError(f"nothing to resume: {checkpoint_path} does not exist; {how}.")
    return output
