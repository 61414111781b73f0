"""Training on healthy volumes: slice extraction, the denoising loop, checkpoints and calibration.

A run keeps its state in ``<model>.run/`` beside the model file: ``checkpoint.pt`` (written
atomically every ``checkpoint_every`` steps, so a killed run resumes at the last saved step),
``loss.csv`` and ``previews/``. The finished model is calibrated on held-out healthy slices.
"""
import csv
import io
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import Cancelled, InputError, OutputError
from .volume_io import Geometry, file_role, is_image_file, read_volume


@dataclass
class TrainingSettings:
    preset: str = "brain-flair"
    noise: str = "synomaly"
    steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    max_timestep: int = 500
    loss: str = "l2"  # "l2", "l1" or "hybrid" (L2 + VLB term)
    schedule: str = "cosine"
    num_steps: int = 1000
    image_size: int = 128
    base_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (16, 8)
    flips: str = "h"  # "h", "hv" or "none"
    intensity_augment: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    preview_every: int = 500
    min_slice_foreground: float = 0.05
    validation_fraction: float = 0.15
    target_fpr: float = 0.01
    device: str = "auto"
    seed: int = 0
    name: str = ""
    description: str = ""
    inference: Dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d


@dataclass
class TrainingCase:
    """One healthy (or partly healthy) volume: slices with any label voxel are left out."""

    name: str
    image: np.ndarray
    geometry: Geometry
    mask: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None


def _case_from_folder(folder: Path) -> Optional[TrainingCase]:
    files = [p for p in sorted(folder.iterdir()) if is_image_file(p)]
    roles: Dict[str, List[Path]] = {"image": [], "mask": [], "labels": []}
    for p in files:
        roles[file_role(p)].append(p)
    if not roles["image"]:
        return None
    if len(roles["image"]) > 1:
        raise InputError(f"{folder}: holds several images ({', '.join(p.name for p in roles['image'])}); "
                         "put one image per case folder (plus optional *mask* and *seg*/*label* files).")
    image, geometry = read_volume(roles["image"][0])
    extras = {}
    for role in ("mask", "labels"):
        if roles[role]:
            arr, _ = read_volume(roles[role][0])
            if arr.shape != image.shape:
                raise InputError(f"{roles[role][0]}: size differs from {roles['image'][0].name}.")
            extras[role] = arr > 0
    return TrainingCase(folder.name, image, geometry, extras.get("mask"), extras.get("labels"))


def find_cases(paths: Sequence) -> List[TrainingCase]:
    """Files are cases; a folder is a case (one image + optional *mask* / *seg* files), or holds case
    folders, or holds plain image files (each one a case). TrainingCase objects pass through."""
    cases = []
    for raw in paths:
        if isinstance(raw, TrainingCase):
            cases.append(raw)
            continue
        path = Path(raw)
        if is_image_file(path):
            image, geometry = read_volume(path)
            cases.append(TrainingCase(path.name.split(".")[0], image, geometry))
        elif path.is_dir():
            case = _case_from_folder(path)
            if case is not None:
                cases.append(case)
            for sub in sorted(p for p in path.iterdir() if p.is_dir()):
                sub_case = _case_from_folder(sub)
                if sub_case is not None:
                    cases.append(sub_case)
        else:
            raise InputError(f"{path}: not an image file or folder.")
    if not cases:
        raise InputError("no training volumes found in " + ", ".join(str(p) for p in paths) + ".")
    return cases


@dataclass
class SliceSet:
    images: "object"  # torch tensor (N, 1, S, S)
    masks: "object"   # torch tensor (N, 1, S, S) bool
    validation: Dict[int, List[int]]  # case index -> reoriented axial indices held out
    summary: Dict


def extract_slices(cases: Sequence[TrainingCase], settings: TrainingSettings, preprocess) -> SliceSet:
    """Healthy axial slices of every case, split by blocks of 8 slices into training and validation."""
    import torch

    from .preprocessing import prepare_volume

    rng = np.random.default_rng(settings.seed)
    prepared_cases, healthy_slices, val_blocks = [], [], []
    for case in cases:
        prepared = prepare_volume(case.image, case.geometry, preprocess, case.mask, what=f"training case {case.name}")
        fg = prepared.foreground
        area = fg.shape[1] * fg.shape[2]
        healthy = [z for z in prepared.slices if fg[z].sum() / area >= settings.min_slice_foreground]
        if case.labels is not None:
            lesion = prepared.orientation.apply(case.labels)
            healthy = [z for z in healthy if not lesion[z].any()]
        blocks = sorted({z // 8 for z in healthy})
        n_val = int(round(len(blocks) * settings.validation_fraction))
        chosen = set(rng.choice(blocks, size=n_val, replace=False).tolist()) if n_val and len(blocks) > 1 else set()
        prepared_cases.append(prepared)
        healthy_slices.append(healthy)
        val_blocks.append(chosen)
    if not any(val_blocks):
        # Small volumes (few blocks each): hold out one block of the case with the most, so calibration
        # always has held-out data.
        ci = int(np.argmax([len({z // 8 for z in h}) for h in healthy_slices]))
        blocks = sorted({z // 8 for z in healthy_slices[ci]})
        if len(blocks) > 1:
            val_blocks[ci] = {int(rng.choice(blocks))}
    images, masks, validation, per_case = [], [], {}, []
    for ci, (case, prepared, healthy, chosen) in enumerate(zip(cases, prepared_cases, healthy_slices, val_blocks)):
        val = [z for z in healthy if z // 8 in chosen]
        train = [z for z in healthy if z // 8 not in chosen]
        if train:
            im, m = prepared.network_slices(train)
            images.append(im)
            masks.append(m)
        validation[ci] = val
        per_case.append({"case": case.name, "train_slices": len(train), "validation_slices": len(val)})
    if not images:
        raise InputError("no healthy slices with enough foreground in the training data.")
    imgs = torch.cat(images)
    summary = {"cases": per_case, "train_slices": int(imgs.shape[0]),
               "validation_slices": int(sum(len(v) for v in validation.values()))}
    return SliceSet(imgs, torch.cat(masks), validation, summary)


def augment(x, m, settings: TrainingSettings, generator):
    """Random flips (the same for image and mask) and a mild gamma / contrast change inside the mask."""
    import torch

    b = x.shape[0]
    if "h" in settings.flips:
        f = torch.rand(b, generator=generator) < 0.5
        x[f], m[f] = x[f].flip(-1), m[f].flip(-1)
    if "v" in settings.flips:
        f = torch.rand(b, generator=generator) < 0.5
        x[f], m[f] = x[f].flip(-2), m[f].flip(-2)
    a = settings.intensity_augment
    if a > 0:
        gamma = torch.exp((torch.rand(b, generator=generator) * 2 - 1) * a).view(-1, 1, 1, 1)
        gain = (1 + (torch.rand(b, generator=generator) * 2 - 1) * a / 2).view(-1, 1, 1, 1)
        y = (((x + 1) / 2).clamp(0, 1) ** gamma * gain * 2 - 1).clamp(-1, 1)
        x = torch.where(m, y, x)
    return x, m


def _save_atomic_torch(obj, path: Path) -> None:
    import torch

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=str(path.parent))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_preview(path: Path, network, schedule, images, device) -> None:
    """Input | noised (t = 200) | one-step counterfactual, one row per validation slice."""
    import torch
    from PIL import Image

    from .volume_io import atomic_write_bytes

    with torch.no_grad():
        x = images.to(device)
        t = torch.full((x.shape[0],), 200, device=device, dtype=torch.long)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
        x_t = schedule.q_sample(x, t, noise)
        pred = schedule.predict_x0(x_t, t, network(x_t, t).float())
    rows = [torch.cat([a, b.clamp(-1, 1), c], dim=-1) for a, b, c in zip(x[:, 0], x_t[:, 0], pred[:, 0])]
    grid = ((torch.cat(rows, dim=-2).cpu().numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def run_dir_for(output: Path) -> Path:
    return output.with_name(output.name.split(".")[0] + ".run")


def train(healthy, output, settings: Optional[TrainingSettings] = None,
          progress: Optional[Callable[[int, int, float, str], None]] = None,
          cancel: Optional[Callable[[], bool]] = None, resume: bool = False) -> Path:
    """Train a model on healthy volumes and write the calibrated model file to ``output``.

    ``healthy``: paths (see ``find_cases``) or TrainingCase objects. ``progress(step, total, loss, msg)``.
    ``cancel()`` is polled every step; on cancel the checkpoint is saved and Cancelled is raised,
    so ``resume=True`` continues where it stopped.
    """
    import torch
    import torch.nn.functional as F

    from .detection import DEFAULT_INFERENCE, resolve_device
    from .network import UNet, UNetConfig, count_parameters
    from .noise import make_noise
    from .presets import get_preset
    from .preprocessing import PreprocessConfig
    from .schedule import DiffusionSchedule

    settings = settings or TrainingSettings()
    output = Path(output)
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent}: folder does not exist; create it first.")
    if output.suffix != ".safetensors":
        raise OutputError(f"{output}: model files end in .safetensors.")
    if settings.loss not in ("l2", "l1", "hybrid"):
        raise InputError(f"unknown loss {settings.loss!r}; choose l2, l1 or hybrid.")
    report = progress or (lambda step, total, loss, msg: None)
    device = resolve_device(settings.device)
    preset = get_preset(settings.preset)
    run_dir = run_dir_for(output)
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.exists() and not resume:
        raise OutputError(f"{run_dir} holds an earlier run; resume it (--resume) or delete the folder.")
    if resume and not checkpoint_path.exists():
        raise OutputError(f"nothing to resume: {checkpoint_path} does not exist.")
    cases = find_cases(healthy)
    preprocess = PreprocessConfig(intensity=preset.intensity, window=preset.window, image_size=settings.image_size)
    report(0, settings.steps, float("nan"), f"extracting slices from {len(cases)} volumes")
    data = extract_slices(cases, settings, preprocess)
    try:
        (run_dir / "previews").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{run_dir}: cannot be created ({exc}).") from None

    torch.manual_seed(settings.seed)
    config = UNetConfig(in_channels=1, out_channels=1, base_channels=settings.base_channels,
                        channel_mult=tuple(settings.channel_mult), num_res_blocks=settings.num_res_blocks,
                        attention_resolutions=tuple(settings.attention_resolutions), image_size=settings.image_size)
    network = UNet(config).to(device)
    ema = UNet(config).to(device)
    ema.load_state_dict(network.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = DiffusionSchedule(settings.num_steps, settings.schedule)
    generator = torch.Generator().manual_seed(settings.seed)
    start, losses, elapsed = 0, [], 0.0
    if resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["settings"] != settings.to_dict():
            changed = [k for k in state["settings"] if state["settings"][k] != settings.to_dict().get(k)]
            if set(changed) - {"steps", "device", "checkpoint_every", "preview_every"}:
                raise InputError(f"cannot resume: settings differ from the saved run ({', '.join(changed)}).")
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, losses, elapsed = int(state["step"]), list(state["losses"]), float(state["elapsed_s"])

    def save_checkpoint(step):
        _save_atomic_torch({"network": network.state_dict(), "ema": ema.state_dict(),
                            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                            "step": step, "losses": losses, "elapsed_s": elapsed + time.perf_counter() - t_start,
                            "settings": settings.to_dict()}, checkpoint_path)
        with open(run_dir / "loss.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows([(i + 1, f"{v:.6f}") for i, v in enumerate(losses)])

    n = data.images.shape[0]
    preview_images = data.images[torch.linspace(0, n - 1, min(4, n)).long()]
    amp = device.type == "cuda"
    network.train()
    t_start = time.perf_counter()
    step = start
    for step in range(start, settings.steps):
        if cancel is not None and cancel():
            save_checkpoint(step)
            raise Cancelled(f"training cancelled at step {step}; resume to continue.")
        idx = torch.randint(n, (settings.batch_size,), generator=generator)
        x, m = augment(data.images[idx].clone(), data.masks[idx].clone(), settings, generator)
        t = torch.randint(0, settings.max_timestep, (x.shape[0],), generator=generator)
        noise = make_noise(settings.noise, x.shape, generator=generator, organ_mask=m, **preset.noise_params())
        x, t, noise = x.to(device), t.to(device), noise.to(device)
        x_t = schedule.q_sample(x, t, noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            eps = network(x_t, t)
        eps = eps.float()
        loss = F.l1_loss(eps, noise) if settings.loss == "l1" else F.mse_loss(eps, noise)
        if settings.loss == "hybrid":
            loss = loss + schedule.vlb_term(x, x_t, t, eps).mean() * 1e-3
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), network.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(float(loss.detach()))
        recent = float(np.mean(losses[-50:]))
        report(step + 1, settings.steps, recent, f"step {step + 1}/{settings.steps} loss {recent:.4f}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save_checkpoint(step + 1)
        if (step + 1) % settings.preview_every == 0 or step + 1 == settings.steps:
            ema.eval()
            _write_preview(run_dir / "previews" / f"step_{step + 1:06d}.png", ema, schedule, preview_images, device)
    wall = elapsed + time.perf_counter() - t_start

    report(settings.steps, settings.steps, float(np.mean(losses[-50:])) if losses else float("nan"), "calibrating")
    inference = dict(DEFAULT_INFERENCE)
    inference["direction"] = int(preset.direction[0]) if len(preset.direction) == 1 else 1
    inference["signed"] = len(preset.direction) == 1
    inference.update(settings.inference)
    metadata = {
        "name": settings.name or output.stem,
        "description": settings.description or f"{settings.preset} model trained on {len(cases)} volumes",
        "preset": settings.preset,
        "noise": {"kind": settings.noise, **preset.noise_params()},
        "schedule": schedule.to_dict(),
        "preprocessing": preprocess.to_dict(),
        "inference": inference,
        "threshold": 0.0,
        "training": {"settings": settings.to_dict(), "data": data.summary, "steps": settings.steps,
                     "wall_time_s": round(wall, 1), "device": str(device),
                     "parameters": count_parameters(network),
                     "final_loss": float(np.mean(losses[-50:])) if losses else None},
    }
    from .model_file import SynomalyModel

    ema.eval()
    model = SynomalyModel(ema, metadata)
    metadata["calibration"] = calibrate(model, cases, data.validation, settings.target_fpr, device)
    metadata["threshold"] = metadata["calibration"]["threshold"]
    from .model_file import save_model

    save_model(output, ema.cpu(), metadata)
    report(settings.steps, settings.steps, float(np.mean(losses[-50:])) if losses else float("nan"), "done")
    return output


def healthy_validation_scores(model, cases: Sequence[TrainingCase], validation: Dict[int, List[int]],
                              device) -> Tuple[np.ndarray, np.ndarray]:
    """Our anomaly-map values and the intensity baseline's scores on held-out healthy foreground voxels."""
    from .baseline import baseline_for
    from .detection import DetectionSettings, detect

    ours, base = [], []
    for ci, val in validation.items():
        if not val:
            continue
        case = cases[ci]
        # The model is calibrated on what it was trained on, stripped or not: no skull check here.
        result = detect(case.image, case.geometry, model, case.mask,
                        DetectionSettings(device=str(device), threshold=float("inf"), skull_check=False), slices=val)
        prepared = result.prepared
        region = np.zeros(prepared.foreground.shape, dtype=bool)
        region[val] = True
        region &= prepared.foreground
        region = prepared.orientation.invert(region)
        ours.append(result.anomaly_map[region])
        scores = baseline_for(prepared)
        base.append(scores[region])
    if not ours:
        raise InputError("no healthy validation slices to calibrate on; give more healthy volumes "
                         "or raise validation_fraction.")
    return np.concatenate(ours), np.concatenate(base)


def calibrate(model, cases: Sequence[TrainingCase], validation: Dict[int, List[int]], target_fpr: float,
              device, baseline_target_fpr: Optional[float] = None) -> Dict:
    """Anomaly threshold = the map value exceeded by ``target_fpr`` of held-out healthy foreground voxels.

    The intensity baseline's threshold is calibrated on the same voxels (at its own target when one was
    chosen for it by the same procedure), so evaluations compare like with like.
    """
    from .baseline import calibrate_threshold

    base_fpr = target_fpr if baseline_target_fpr is None else float(baseline_target_fpr)
    ours, base = healthy_validation_scores(model, cases, validation, device)
    return {"threshold": float(calibrate_threshold(ours, target_fpr)), "target_fpr": target_fpr,
            "voxels": int(ours.size), "baseline_threshold": float(calibrate_threshold(base, base_fpr)),
            "baseline_target_fpr": base_fpr, "baseline_median_size": 5}


def settings_from_model(metadata: Dict) -> TrainingSettings:
    saved = dict(metadata["training"]["settings"])
    for key in ("channel_mult", "attention_resolutions"):
        saved[key] = tuple(saved[key])
    return TrainingSettings(**{k: v for k, v in saved.items() if k in TrainingSettings.__dataclass_fields__})


def recalibrate(model_path, healthy, output=None, inference: Optional[Dict] = None, target_fpr=None,
                device: str = "auto", baseline_target_fpr=None) -> Path:
    """Calibrate a trained model again on the same held-out healthy slices (the split is reproducible
    from the stored settings), optionally with new inference defaults; writes ``output`` (default: in place)."""
    from .detection import resolve_device
    from .model_file import load_model, save_model
    from .preprocessing import PreprocessConfig

    model = load_model(model_path)
    settings = settings_from_model(model.metadata)
    cases = find_cases(healthy)
    data = extract_slices(cases, settings, PreprocessConfig.from_dict(model.metadata["preprocessing"]))
    if inference:
        model.metadata["inference"].update(inference)
    fpr = settings.target_fpr if target_fpr is None else float(target_fpr)
    model.metadata["calibration"] = calibrate(model, cases, data.validation, fpr, resolve_device(device),
                                              baseline_target_fpr)
    model.metadata["threshold"] = model.metadata["calibration"]["threshold"]
    return save_model(Path(output or model_path), model.network.cpu(), model.metadata)
