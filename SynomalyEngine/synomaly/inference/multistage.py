"""Multi-stage diffusion with masked fusion, for a batch of slices, each slice converging on its own.

Per stage: noise the current estimate to ``t``, one network call gives a one-step counterfactual,
the difference map decides where the counterfactual replaces the input for the next stage.
"""
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from synomaly.errors import Cancelled
from synomaly.method.noise import gaussian_blur2d


@dataclass
class StageSettings:
    noise_level: int = 200
    max_stages: int = 3
    kernel_size: int = 7          # Gaussian kernel of the difference map (odd, as in the reference grid 3-17)
    fusion_threshold: float = 0.2  # on the [-1, 1] scale
    min_component_px: int = 30
    soft_fusion: bool = False      # True: the map values weight the fusion; False: its binary support
    signed: bool = True            # keep only differences in the preset's direction
    direction: int = 1
    tolerance: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


def kernel_sigma(kernel_size: int) -> float:
    """The sigma OpenCV derives from a kernel size, so kernel sizes mean what they mean in the reference."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def difference(x0: torch.Tensor, pred: torch.Tensor, settings: StageSettings) -> torch.Tensor:
    """Blurred input minus blurred counterfactual, rectified (signed) or absolute."""
    sigma = kernel_sigma(settings.kernel_size)
    diff = gaussian_blur2d(x0, sigma) - gaussian_blur2d(pred, sigma)
    return (settings.direction * diff).clamp_min(0) if settings.signed else diff.abs()


def remove_small_components_2d(binary: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_size`` pixels, slice by slice of a (N, H, W) stack."""
    from scipy import ndimage

    if min_size <= 1 or not binary.any():
        return binary
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n = ndimage.label(binary, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def difference_map(x0: torch.Tensor, pred: torch.Tensor, foreground: torch.Tensor,
                   settings: StageSettings) -> torch.Tensor:
    """SPEC's map: blurred difference, zero below the threshold, small components removed."""
    diff = difference(x0, pred, settings) * foreground
    binary = (diff > settings.fusion_threshold)[:, 0].cpu().numpy()
    keep = torch.from_numpy(remove_small_components_2d(binary, settings.min_component_px))[:, None]
    return diff * keep.to(diff.device)


def middle(x: torch.Tensor) -> torch.Tensor:
    """The slice itself of a (N, 1 + 2k, S, S) stack of it and its neighbours (2.5D input), as (N, 1, S, S):
    a view, so that writing into it writes the stack."""
    mid = x.shape[1] // 2
    return x[:, mid:mid + 1]


@torch.no_grad()
def one_step_counterfactual(network, schedule, x: torch.Tensor, t: int, generator=None) -> torch.Tensor:
    """Noise every channel of ``x`` to level ``t`` and estimate the clean middle slice: (N, 1, S, S)."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu").to(x.device)
    timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    x_t = schedule.q_sample(x, timesteps, noise)
    eps = network(x_t, timesteps)
    return schedule.predict_x0(middle(x_t), timesteps, eps.float())


@dataclass
class StageResult:
    counterfactual: torch.Tensor  # (N, 1, S, S)
    stages: List[int]             # stages run per slice


def run_stages(network, schedule, x0: torch.Tensor, foreground: torch.Tensor, settings: StageSettings,
               batch_size: int = 16, generator: Optional[torch.Generator] = None,
               progress: Optional[Callable[[int, int, str], None]] = None,
               cancel: Optional[Callable[[], bool]] = None) -> StageResult:
    """Run the stages over all slices; a slice leaves the active set once its map stops changing.

    ``x0``: (N, 1 + 2k, S, S), each slice with its neighbours (2.5D); the counterfactual and the fusion
    are the middle slice's, and later stages see the neighbours as they were given.
    Slices stay on ``x0``'s device between stages (no host round trip). ``progress(done, total, msg)``
    counts network slice-evaluations: ``done`` so far, ``total`` the estimate of all that will be
    needed (see ``estimated_evaluations``), which shrinks as slices converge.
    """
    n = x0.shape[0]
    cache = x0.clone()
    given = middle(x0)
    pred = given.clone()
    prev_count = torch.zeros(n, device=x0.device)
    active = torch.ones(n, dtype=torch.bool, device=x0.device)
    stages = [0] * n
    done = 0
    for stage in range(1, settings.max_stages + 1):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        staying = 0
        for start in range(0, idx.numel(), batch_size):
            if cancel is not None and cancel():
                raise Cancelled("detection cancelled")
            b = idx[start:start + batch_size]
            p = one_step_counterfactual(network, schedule, cache[b], settings.noise_level, generator)
            pred[b] = p
            m = difference_map(given[b], p, foreground[b], settings)
            weights = m if settings.soft_fusion else (m > 0).float()
            weights = weights.clamp(0, 1)
            middle(cache)[b] = p * weights + given[b] * (1 - weights)
            count = (m > 0).flatten(1).sum(1).float()
            change = (prev_count[b] - count).abs() / prev_count[b].clamp_min(500)
            prev_count[b] = count
            active[b] = change >= settings.tolerance
            for i in b.tolist():
                stages[i] = stage
            done += b.numel()
            staying += int(active[b].sum())
            seen = min(start + batch_size, idx.numel())
            if progress is not None:
                survival = staying / seen
                total = done + estimated_evaluations(idx.numel() - seen, staying, survival,
                                                     settings.max_stages - stage)
                progress(done, total, f"stage {stage}/{settings.max_stages}: {seen}/{idx.numel()} slices")
    return StageResult(pred, stages)


def estimated_evaluations(unseen: int, staying: int, survival: float, stages_left: int) -> float:
    """Network slice-evaluations still to come: the ``unseen`` slices of this stage, then in each later
    stage the slices still changing, assuming the share ``survival`` seen so far keeps holding."""
    active = staying + unseen * survival
    return unseen + sum(active * survival ** k for k in range(stages_left))


class MonotoneProgress:
    """Turns (work done, estimated total work) into a fraction that never goes back: each step moves
    the bar by the share of the estimated remaining work it did, so a shrinking estimate speeds
    the bar up instead of making it jump, and it ends at 1 exactly when no work remains."""

    def __init__(self):
        self.fraction = 0.0
        self.done = 0.0

    def __call__(self, done: float, total: float) -> float:
        step = done - self.done
        remaining = max(float(total) - done, 0.0)
        if step > 0:
            self.fraction += (1.0 - self.fraction) * (step / (step + remaining))
            self.done = done
        return self.fraction


def run_single_stage(network, schedule, x0, noise_levels, batch_size=16, generator=None,
                     progress: Optional[Callable[[int, int, str], None]] = None,
                     cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """Comparison mode: one noise level, or a fixed list applied in sequence, without fusion; returns
    the middle slices' counterfactuals (N, 1, S, S)."""
    out = x0.clone()
    n = x0.shape[0]
    total, done = n * len(noise_levels), 0
    for level, t in enumerate(noise_levels, start=1):
        for start in range(0, n, batch_size):
            if cancel is not None and cancel():
                raise Cancelled("detection cancelled")
            middle(out)[start:start + batch_size] = one_step_counterfactual(
                network, schedule, out[start:start + batch_size], int(t), generator)
            done += out[start:start + batch_size].shape[0]
            if progress is not None:
                progress(done, total, f"noise level {level}/{len(noise_levels)}: {min(start + batch_size, n)}/{n} "
                                      "slices")
    return middle(out)
