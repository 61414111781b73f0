"""Training settings, every one checked before any data are read (``TrainingSettings.validate``), so that
the command line, the Slicer module and the Python API refuse the same things in one line."""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Sequence, Tuple

import numpy as np

from synomaly.errors import InputError


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
    # Additive shift inside the mask, up to this share of the intensity window each way: another contrast
    # phase of CT (0.2 of liver-ct's 150 HU window is +-30 HU).
    intensity_shift: float = 0.0
    # Random smooth multiplicative fields on half of the slices, exp(s * f) with s up to this and f a random
    # tilted bowl from -1 to 1 over the slice: coil bias fields that N4 was not run on (issue 19: a 0.6 field
    # cost the brain model up to 0.35 Dice). 0: none.
    bias_field: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    preview_every: int = 500
    min_slice_foreground: float = 0.05
    # "skip": slices with any labelled lesion voxel are left out. "mask": they are used, with the lesion
    # grown by lesion_margin_mm left out of the loss and of where synthetic anomalies are placed: far
    # more healthy tissue at the levels where lesions occur.
    lesion_slices: str = "skip"
    lesion_margin_mm: float = 5.0
    precision: str = "auto"  # "auto": runtime.resolve_training_precision (fp32 but where bf16 measured faster)
    # torch.compile the training step's network (fused elementwise work): on an H100 the bf16 step of the
    # default network ran 1.75x faster after about a minute of compiling; no gain measured on a CPU.
    compile: bool = False
    validation_fraction: float = 0.15
    target_fpr: float = 0.01
    device: str = "auto"
    seed: int = 0
    name: str = ""
    description: str = ""
    inference: Dict = field(default_factory=dict)
    # 2.5D: the network also sees this many neighbouring slices each side, as channels (0: 2D).
    context_slices: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    def network_config(self):
        from synomaly.method.network import UNetConfig

        return UNetConfig(in_channels=1 + 2 * self.context_slices, out_channels=1, base_channels=self.base_channels,
                          channel_mult=tuple(self.channel_mult), num_res_blocks=self.num_res_blocks,
                          attention_resolutions=tuple(self.attention_resolutions), image_size=self.image_size)

    def validate(self) -> None:
        """Refuse, with one line naming it, any setting a run would fail on (or silently waste time on).

        Called at the start of ``train`` before data are read or anything is written, so the command
        line, the Slicer module and the Python API share the same checks. The checks that need torch
        (noise kinds, the network) come last, so that most refusals are instant."""
        from synomaly.method.presets import PRESETS

        choices = {"preset": tuple(PRESETS), "loss": ("l2", "l1", "hybrid"), "schedule": ("cosine", "linear"),
                   "flips": ("h", "v", "hv", "none"), "lesion_slices": ("skip", "mask"),
                   "precision": ("auto", "fp32", "bf16")}
        for key, allowed in choices.items():
            _check_choice(getattr(self, key), key, allowed)
        for key, minimum in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("preview_every", 1),
                             ("num_steps", 2), ("max_timestep", 1), ("num_res_blocks", 1), ("base_channels", 1),
                             ("image_size", 1), ("seed", 0), ("context_slices", 0)):
            _check_whole(getattr(self, key), _LABELS.get(key, key.replace("_", " ")), minimum)
        if not isinstance(self.compile, bool):
            raise InputError(f"compile must be True or False, got {self.compile!r}.")
        if self.context_slices > 0 and PRESETS[self.preset].two_d:
            raise InputError(f"context slices need volumes: the {self.preset} preset works on 2D images, which have "
                             "no neighbouring slices; leave context slices at 0.")
        if self.max_timestep > self.num_steps:
            raise InputError(f"max timestep {self.max_timestep} exceeds the schedule's {self.num_steps} steps.")
        if self.seed >= 2 ** 63:
            raise InputError(f"seed must be below 2**63, got {self.seed}.")
        check_number(self.lr, "learning rate", 0.0, math.inf)
        check_number(self.target_fpr, "target false-positive rate", 0.0, 1.0)
        check_number(self.weight_decay, "weight decay", 0.0, math.inf, low_included=True)
        check_number(self.grad_clip, "gradient clipping norm", 0.0, math.inf)
        check_number(self.ema_decay, "EMA decay", 0.0, 1.0, low_included=True)
        check_number(self.intensity_augment, "intensity augmentation", 0.0, 1.0, low_included=True)
        check_number(self.intensity_shift, "intensity shift", 0.0, 1.0, low_included=True)
        check_number(self.bias_field, "bias field strength", 0.0, 2.0, low_included=True)
        check_number(self.min_slice_foreground, "minimum slice foreground", 0.0, 1.0, low_included=True)
        check_number(self.validation_fraction, "validation fraction", 0.0, 1.0, low_included=True)
        check_number(self.lesion_margin_mm, "lesion margin (mm)", 0.0, math.inf, low_included=True)
        if not isinstance(self.inference, dict):
            raise InputError(f"inference settings must be a dict, got {type(self.inference).__name__}.")
        from synomaly.method.network import config_problem
        from synomaly.method.noise import NOISE_FUNCTIONS

        _check_choice(self.noise, "noise", tuple(sorted(NOISE_FUNCTIONS)))
        problem = config_problem(self.network_config())
        if problem:
            raise InputError(problem)


_LABELS = {"lr": "learning rate", "checkpoint_every": "checkpoint interval", "preview_every": "preview interval",
           "num_steps": "number of diffusion steps", "num_res_blocks": "residual blocks per level",
           "context_slices": "context slices"}


def _check_choice(value, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}.")


def _check_whole(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")


def check_number(value, name: str, low: float, high: float, low_included: bool = False) -> None:
    """A finite number in (low, high), or [low, high) with ``low_included``; ``high`` is never included."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value) and (low <= value if low_included else low < value) and value < high
    if not ok:
        if math.isinf(high):
            wanted = f"a finite number {'of at least' if low_included else 'above'} {low:g}"
        elif low_included:
            wanted = f"a number from {low:g} to below {high:g}"
        else:
            wanted = f"a number between {low:g} and {high:g}, both excluded"
        raise InputError(f"{name} must be {wanted}, got {value!r}.")
