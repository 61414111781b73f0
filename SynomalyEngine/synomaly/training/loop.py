"""The denoising loop: a run prepared and checked, its steps with checkpoints and stop requests, and the
calibrated model written at the end.

A run keeps its state in ``<model>.run/`` beside the model file: ``checkpoint.pt`` (written
atomically every ``checkpoint_every`` steps and when ``cancel()`` says stop, so a stopped run resumes
at its step and a killed one at the last saved step), ``loss.csv`` and ``previews/``. Every setting
is checked before any data are read (``TrainingSettings.validate``). The finished model is calibrated
on held-out healthy slices. Under torchrun the processes share every batch (``distributed``).
"""
import csv
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np

from synomaly.errors import Cancelled, InputError, OutputError
from synomaly.files.library_messages import last_line
from synomaly.files.volume_io import is_2d
from synomaly.training.calibration import calibrate
from synomaly.training.cases import find_cases
from synomaly.training.checkpoints import (check_run, read_checkpoint, remove_leftovers, run_dir_for,
                                          save_atomic_torch)
from synomaly.training.settings import TrainingSettings
from synomaly.training.slices import augment, extract_slices


def _write_preview(path: Path, network, schedule, images, device) -> None:
    """Input | noised (t = 200) | one-step counterfactual, one row per validation slice."""
    import torch
    from PIL import Image

    from synomaly.files.volume_io import atomic_write_bytes
    from synomaly.inference.multistage import middle

    with torch.no_grad():
        x = images.to(device)
        t = torch.full((x.shape[0],), 200, device=device, dtype=torch.long)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
        x_t = schedule.q_sample(x, t, noise)
        pred = schedule.predict_x0(middle(x_t), t, network(x_t, t).float())
        x, x_t = middle(x), middle(x_t)
    rows = [torch.cat([a, b.clamp(-1, 1), c], dim=-1) for a, b, c in zip(x[:, 0], x_t[:, 0], pred[:, 0])]
    grid = ((torch.cat(rows, dim=-2).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


COMPILE_ALONE = ("--compile trains in one process only (not tried with several, where DDP splits the graph); "
                 "leave out --compile, or --nproc and torchrun.")


def compiled(module, batch_shape, device, amp: bool):
    """``torch.compile(module)``, compiled now, on a zero batch of the training shape (forward and backward
    graphs are built at the first call): a compiler that is missing or fails is one InputError before any
    step, not a traceback mid-run."""
    import torch

    from synomaly.inference.runtime import autocast

    fast = torch.compile(module)
    try:
        x = torch.zeros(batch_shape, device=device)
        t = torch.zeros(batch_shape[0], dtype=torch.long, device=device)
        with autocast(device, "bf16" if amp else "fp32"):
            fast(x, t)
    except Exception as exc:  # the compiler's errors are many kinds (missing C++ compiler, Triton, lowering)
        # Their first line says what failed; the last ones tell how to get torch's own trace.
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise InputError(f"torch.compile could not build the network ({reason}); train without compiling "
                         "(leave out --compile): the same training, slower on a GPU.") from None
    return fast


def train(healthy, output, settings: Optional[TrainingSettings] = None,
          progress: Optional[Callable[[int, int, float, str], None]] = None,
          cancel: Optional[Callable[[], bool]] = None, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a model on healthy volumes and write the calibrated model file to ``output``.

    ``healthy``: paths (see ``find_cases``) or TrainingCase objects. ``progress(step, total, loss, msg)``
    is called after each step (and its checkpoint, when one is due). ``cancel()`` is polled every step
    and during calibration; on cancel the checkpoint is saved at the current step and Cancelled is
    raised, so ``resume=True`` continues where it stopped. ``overwrite=True`` starts afresh, replacing
    an earlier model file and run folder. Settings, the output and the saved run are checked before
    any data are read; nothing is written until the data are found good.

    Started by torchrun in several processes (``synomaly.training.distributed``), every process calls ``train``
    with the same arguments and trains on its share of every batch; the loss curve is that of one
    process up to floating-point rounding. Rank 0 alone writes the run folder, calibrates and writes
    the model; the others return once the last step is trained. A stop request in any process stops
    all at the same step.
    """
    from synomaly.training.distributed import Team

    team = Team.from_environment()
    try:
        return _train(team, healthy, output, settings or TrainingSettings(), progress, cancel, resume, overwrite)
    finally:
        team.leave()


@dataclass
class _Run:
    """What one run's steps and its end need: the settings, data, networks and where they are saved."""

    team: Any
    settings: TrainingSettings
    output: Path
    preset: Any
    device: Any
    cases: list
    data: Any
    preprocess: Any
    network: Any
    ema: Any
    optimizer: Any
    schedule: Any
    generator: Any
    start: int
    losses: List[float]
    elapsed: float
    share: Any
    weight: float
    precision: str
    fast_network: Any = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.output)

    @property
    def amp(self) -> bool:
        return self.precision == "bf16"

    def recent_loss(self) -> float:
        return float(np.mean(self.losses[-50:])) if self.losses else float("nan")

    def save_checkpoint(self, step: int) -> None:
        save_atomic_torch({"network": self.network.state_dict(), "ema": self.ema.state_dict(),
                           "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                           "step": step, "losses": self.losses,
                           "elapsed_s": self.elapsed + time.perf_counter() - self.t_start,
                           "settings": self.settings.to_dict()}, self.run_dir / "checkpoint.pt")
        with open(self.run_dir / "loss.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows([(i + 1, f"{v:.6f}") for i, v in enumerate(self.losses)])

    def stop_if_asked(self, step: int, cancel) -> None:
        if self.team.any(cancel is not None and cancel()):
            if self.team.main:
                self.save_checkpoint(step)
            self.team.barrier()  # the others end only once it is saved: a launcher stops the rest when one ends
            raise Cancelled(f"training stopped at step {step} of {self.settings.steps}; checkpoint saved in "
                            f"{self.run_dir}")


def _train(team, healthy, output, settings: TrainingSettings, progress, cancel, resume: bool, overwrite: bool) -> Path:
    report = progress or (lambda step, total, loss, msg: None)
    with team.together():  # every process checks and reads alike; an error in one stops all before any write
        run = _prepare(team, healthy, output, settings, report, resume, overwrite)
    with team.together():
        if team.main:
            try:
                if overwrite and run.run_dir.exists():
                    shutil.rmtree(run.run_dir)
                (run.run_dir / "previews").mkdir(parents=True, exist_ok=True)
                remove_leftovers(run.run_dir)
            except OSError as exc:
                raise OutputError(f"{run.run_dir}: cannot be created ({exc.strerror or exc}); "
                                  "choose another model file.") from None
    try:
        _steps(run, report, cancel)
    except (RuntimeError, MemoryError) as exc:
        if not isinstance(exc, MemoryError) and "memory" not in str(exc).lower():
            raise
        _refuse_batch(run, exc)
    run.stop_if_asked(settings.steps, cancel)
    if not team.main:
        return run.output
    return _finish(run, report, cancel)


def _refuse_batch(run: _Run, exc: BaseException) -> None:
    """A batch that does not fit in memory: one line saying what to change; a run that had saved nothing leaves
    no run folder behind (it would block the next run)."""
    if run.team.main and not (run.run_dir / "checkpoint.pt").exists():
        shutil.rmtree(run.run_dir, ignore_errors=True)
    detail = next((line.strip() for line in str(exc).splitlines() if "memory" in line.lower()), type(exc).__name__)
    smaller = max(1, run.settings.batch_size // 4)
    raise InputError(f"a batch of {run.settings.batch_size} slices of {run.settings.image_size} px does not fit in "
                     f"this machine's memory ({detail[:160]}); train with a smaller --batch-size (e.g. {smaller}).") \
        from None


def _prepare(team, healthy, output, settings: TrainingSettings, report, resume: bool, overwrite: bool) -> _Run:
    """Check the run, build the networks (from the checkpoint when resuming), read the data and compile:
    everything that may refuse, before anything is written."""
    if settings.compile and team.world_size > 1:
        raise InputError(COMPILE_ALONE)
    output = check_run(output, settings, resume, overwrite)
    checkpoint_path = run_dir_for(output) / "checkpoint.pt"

    # torch only now: refusals above are instant.
    import torch

    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.inference.runtime import resolve_training_precision
    from synomaly.method.network import UNet
    from synomaly.method.presets import get_preset, missing_mask_message
    from synomaly.method.schedule import DiffusionSchedule
    from synomaly.training.distributed import check_share

    device = team.resolve_device(settings.device)
    check_share(team.world_size, settings.batch_size)
    preset = get_preset(settings.preset)

    torch.manual_seed(settings.seed)
    config = settings.network_config()
    network = UNet(config).to(device)
    ema = UNet(config).to(device)
    ema.load_state_dict(network.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = DiffusionSchedule(settings.num_steps, settings.schedule)
    generator = torch.Generator().manual_seed(settings.seed)
    start, losses, elapsed = 0, [], 0.0
    if resume:
        state = read_checkpoint(checkpoint_path, settings, device)
        try:
            network.load_state_dict(state["network"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            start, losses, elapsed = state["step"], [float(v) for v in state["losses"]], float(state["elapsed_s"])
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{checkpoint_path}: does not match its own settings ({last_line(exc)}); "
                             "start afresh with --overwrite.") from None

    cases = find_cases(healthy)
    unmasked = [case.name for case in cases if case.mask is None]
    mask_needed = missing_mask_message(settings.preset, "train")
    if unmasked and mask_needed:
        raise InputError(f"{len(unmasked)} of {len(cases)} training cases have no mask "
                         f"({', '.join(unmasked[:5])}{', ...' if len(unmasked) > 5 else ''}): {mask_needed}")
    preprocess = PreprocessConfig(intensity=preset.intensity, window=preset.window, image_size=settings.image_size,
                                  disc_margin_px=preset.disc_margin_px, disc_margin_mm=preset.disc_margin_mm,
                                  context_slices=settings.context_slices)
    report(0, settings.steps, float("nan"), f"extracting slices from {len(cases)} volumes")
    data = extract_slices(cases, settings, preprocess)
    share, weight = team.share(settings.batch_size)
    per_process = len(range(settings.batch_size)[share])
    precision = resolve_training_precision(device, settings.precision, per_process, settings.compile)
    run = _Run(team, settings, output, preset, device, cases, data, preprocess, network, ema, optimizer, schedule,
               generator, start, losses, elapsed, share, weight, precision)
    if settings.compile:  # before the run folder is made: a compiler that fails leaves nothing behind
        report(start, settings.steps, float("nan"), "compiling the network (a minute or two)")
        network.train()  # compiled in the mode it trains in
        run.fast_network = compiled(network, (per_process,) + tuple(data.images.shape[1:]), device, run.amp)
    return run


def _steps(run: _Run, report, cancel) -> None:
    """The training steps from ``run.start``, each process on its share of every batch."""
    import torch

    from synomaly.inference.multistage import middle
    from synomaly.inference.runtime import autocast
    from synomaly.method.noise import make_noise

    settings, team, data, device, schedule = run.settings, run.team, run.data, run.device, run.schedule
    n = data.images.shape[0]
    preview_images = data.images[torch.linspace(0, n - 1, min(4, n)).long()]
    module = run.fast_network if settings.compile else team.wrap(run.network)  # compile is for one process alone
    module.train()
    ema_params, net_params = list(run.ema.parameters()), [p.detach() for p in run.network.parameters()]
    run.t_start = time.perf_counter()
    for step in range(run.start, settings.steps):
        run.stop_if_asked(step, cancel)
        # Every process draws the whole batch, so the generator (and with it a checkpoint) does not depend
        # on the process count, and trains on its share of it.
        idx = torch.randint(n, (settings.batch_size,), generator=run.generator)
        keep = data.keep[idx].clone() if data.keep is not None else None
        x, m, keep = augment(data.images[idx].clone(), data.masks[idx].clone(), settings, run.generator, keep)
        t = torch.randint(0, settings.max_timestep, (x.shape[0],), generator=run.generator)
        blobs_where = m if keep is None else m & keep
        # Drawn from the CPU generator (runs reproduce whatever the device), shaped on the device.
        noise = make_noise(settings.noise, x.shape, generator=run.generator, organ_mask=blobs_where, device=device,
                           **run.preset.noise_params())
        x, t, noise = x[run.share].to(device), t[run.share].to(device), noise[run.share]
        x_t = schedule.q_sample(x, t, noise)
        with autocast(device, run.precision):
            eps = module(x_t, t)
        eps = eps.float()
        target = middle(noise)  # with neighbouring slices as channels, the network answers for the middle one
        error = (eps - target).abs() if settings.loss == "l1" else (eps - target) ** 2
        if keep is None:
            loss = error.mean()
        else:  # grown lesions count for nothing: the network is never taught what a lesion's noise looks like
            weights = keep[run.share].to(device, dtype=error.dtype)
            loss = (error * weights).sum() / weights.sum().clamp(min=1.0)
        if settings.loss == "hybrid":
            loss = loss + schedule.vlb_term(middle(x), middle(x_t), t, eps).mean() * 1e-3
        run.optimizer.zero_grad(set_to_none=True)
        (loss * run.weight).backward()  # gradients averaged over processes: those of the whole batch's mean loss
        torch.nn.utils.clip_grad_norm_(run.network.parameters(), settings.grad_clip)
        run.optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        run.losses.append(team.mean(float(loss.detach()), run.weight))
        if team.main and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            run.save_checkpoint(step + 1)
        recent = float(np.mean(run.losses[-50:]))
        report(step + 1, settings.steps, recent, f"step {step + 1}/{settings.steps} loss {recent:.4f}")
        if team.main and ((step + 1) % settings.preview_every == 0 or step + 1 == settings.steps):
            run.ema.eval()
            _write_preview(run.run_dir / "previews" / f"step_{step + 1:06d}.png", run.ema, schedule,
                           preview_images, device)


def _threads() -> int:
    """CPU threads each process trained with: the wall time means little without it."""
    import torch

    return int(torch.get_num_threads())


def _finish(run: _Run, report, cancel) -> Path:
    """Calibrate the EMA network on the held-out healthy slices and write the model file."""
    from synomaly.files.model_file import SynomalyModel, save_model
    from synomaly.inference.detection import DEFAULT_INFERENCE
    from synomaly.method.network import count_parameters

    settings, preset = run.settings, run.preset
    wall = run.elapsed + time.perf_counter() - run.t_start
    report(settings.steps, settings.steps, run.recent_loss(), "calibrating")
    inference = dict(DEFAULT_INFERENCE)
    inference["direction"] = int(preset.direction[0]) if len(preset.direction) == 1 else 1
    inference["signed"] = len(preset.direction) == 1
    inference.update(settings.inference)
    metadata = {
        "name": settings.name or run.output.stem,
        "description": settings.description or f"{settings.preset} model trained on {len(run.cases)} "
                       f"{'images' if all(is_2d(c.image.shape) for c in run.cases) else 'volumes'}",
        "preset": settings.preset,
        "noise": {"kind": settings.noise, **preset.noise_params()},
        "schedule": run.schedule.to_dict(),
        "preprocessing": run.preprocess.to_dict(),
        "inference": inference,
        "threshold": 0.0,
        "training": {"settings": settings.to_dict(), "data": run.data.summary, "steps": settings.steps,
                     "wall_time_s": round(wall, 1), "device": str(run.device), "precision": run.precision,
                     "world_size": run.team.world_size, "threads": _threads(),
                     "parameters": count_parameters(run.network),
                     "final_loss": float(np.mean(run.losses[-50:])) if run.losses else None},
    }
    run.ema.eval()
    model = SynomalyModel(run.ema, metadata)
    try:
        metadata["calibration"] = calibrate(model, run.cases, run.data.validation, settings.target_fpr, run.device,
                                            cancel=cancel)
    except Cancelled:
        raise Cancelled(f"training stopped while calibrating, after all {settings.steps} steps; checkpoint saved "
                        f"in {run.run_dir}") from None
    metadata["threshold"] = metadata["calibration"]["threshold"]
    save_model(run.output, run.ema.cpu(), metadata)
    report(settings.steps, settings.steps, run.recent_loss(), "done")
    return run.output
