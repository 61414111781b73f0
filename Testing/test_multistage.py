"""Multi-stage inference with a small real network of known behaviour (an analytic denoiser that
always predicts the same healthy image): fusion keeps the input where the map is zero, slices
converge on their own, and ensembles/single-stage mode run."""
import torch

from synomaly.inference.multistage import (MonotoneProgress, StageSettings, difference_map, run_single_stage,
                                           run_stages)
from synomaly.method.schedule import DiffusionSchedule


class HealthyImageDenoiser(torch.nn.Module):
    """Returns the noise that makes the one-step x0 prediction equal a fixed healthy image."""

    def __init__(self, schedule, healthy):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("healthy", healthy)
        self.inputs = []

    def forward(self, x_t, t):
        self.inputs.append((x_t.clone(), t.clone()))
        abar = torch.as_tensor(self.schedule.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.healthy) / (1 - abar).sqrt()


def _images(n=4, size=48):
    healthy = torch.full((1, 1, size, size), -0.5)
    x = healthy.repeat(n, 1, 1, 1).clone()
    x[0, :, 10:22, 10:22] = 0.8       # a bright anomaly in slice 0
    x[2, :, 30:40, 5:15] = 0.6        # and in slice 2
    return healthy, x


def test_fusion_keeps_input_where_map_is_zero_and_uses_prediction_inside():
    schedule = DiffusionSchedule()
    healthy, x0 = _images()
    net = HealthyImageDenoiser(schedule, healthy)
    fg = torch.ones_like(x0, dtype=torch.bool)
    settings = StageSettings(noise_level=150, max_stages=2, tolerance=-1.0)  # never converge: two stages
    generator = torch.Generator().manual_seed(0)
    result = run_stages(net, schedule, x0, fg, settings, batch_size=8, generator=generator)
    assert torch.allclose(result.counterfactual, healthy.expand_as(x0), atol=1e-5)
    map1 = difference_map(x0, healthy.expand_as(x0), fg, settings)
    expected_cache = torch.where(map1 > 0, healthy.expand_as(x0), x0)
    # Replay the noise draws to recover the cache that stage 2 noised.
    replay = torch.Generator().manual_seed(0)
    torch.randn(x0.shape, generator=replay)
    noise2 = torch.randn(x0.shape, generator=replay)
    x_t2, t2 = net.inputs[1]
    abar = float(schedule.alphas_cumprod[150])
    cache = (x_t2 - (1 - abar) ** 0.5 * noise2) / abar ** 0.5
    assert torch.allclose(cache, expected_cache, atol=1e-4)
    untouched = map1 == 0
    assert torch.equal(cache[untouched].round(decimals=3), x0[untouched].round(decimals=3))
    assert (map1[0] > 0).sum() > 50 and (map1[1] > 0).sum() == 0


def test_each_slice_converges_on_its_own():
    schedule = DiffusionSchedule()
    healthy, x0 = _images()
    net = HealthyImageDenoiser(schedule, healthy)
    fg = torch.ones_like(x0, dtype=torch.bool)
    result = run_stages(net, schedule, x0, fg, StageSettings(max_stages=5), batch_size=2,
                        generator=torch.Generator().manual_seed(0))
    # Healthy slices: empty map at stage 1, converged. Anomalous slices: the same map at stage 2.
    assert result.stages == [2, 1, 2, 1]
    assert sum(x.shape[0] for x, _ in net.inputs) == 6


def test_small_components_and_foreground_are_removed_from_the_map():
    settings = StageSettings(min_component_px=30, kernel_size=3)
    x0 = torch.full((1, 1, 40, 40), -0.5)
    x0[0, 0, 5:7, 5:7] = 1.0           # 4 pixels: too small after blurring
    x0[0, 0, 20:30, 20:30] = 1.0       # 100 pixels: kept
    pred = torch.full_like(x0, -0.5)
    fg = torch.ones_like(x0, dtype=torch.bool)
    m = difference_map(x0, pred, fg, settings)
    assert m[0, 0, 5:7, 5:7].max() == 0 and m[0, 0, 22:28, 22:28].min() > 0
    fg[0, 0, 20:30, 20:25] = False
    assert difference_map(x0, pred, fg, settings)[0, 0, 20:30, 20:25].max() == 0


def test_signed_map_ignores_darker_input():
    settings = StageSettings(signed=True, direction=1, min_component_px=1)
    x0 = torch.full((1, 1, 32, 32), -0.5)
    x0[0, 0, 8:16, 8:16] = -1.0        # darker than the counterfactual: not a FLAIR tumour
    pred = torch.full_like(x0, -0.5)
    fg = torch.ones_like(x0, dtype=torch.bool)
    assert difference_map(x0, pred, fg, settings).max() == 0
    settings.signed = False
    assert difference_map(x0, pred, fg, settings).max() > 0.2


def test_single_stage_applies_noise_levels_in_sequence():
    schedule = DiffusionSchedule()
    healthy, x0 = _images()
    net = HealthyImageDenoiser(schedule, healthy)
    out = run_single_stage(net, schedule, x0, [100, 250], batch_size=2, generator=torch.Generator().manual_seed(1))
    assert [int(t[0]) for _, t in net.inputs] == [100, 100, 250, 250]
    assert torch.allclose(out, healthy.expand_as(x0), atol=1e-5)


def test_progress_moves_forward_evenly_as_slices_converge():
    """36 of 40 slices converge at stage 1 of 5: the bar must neither stop short of its end nor jump to
    it, and never go back, although the work left is only known as slices converge."""
    schedule = DiffusionSchedule()
    healthy = torch.full((1, 1, 48, 48), -0.5)
    x0 = healthy.repeat(40, 1, 1, 1).clone()
    for i in (3, 13, 23, 33):
        x0[i, :, 10:22, 10:22] = 0.8
    net = HealthyImageDenoiser(schedule, healthy)
    fg = torch.ones_like(x0, dtype=torch.bool)
    meter, fractions = MonotoneProgress(), []
    result = run_stages(net, schedule, x0, fg, StageSettings(max_stages=5), batch_size=4,
                        generator=torch.Generator().manual_seed(0),
                        progress=lambda done, total, message: fractions.append(meter(done, total)))
    assert sum(result.stages) == 44 and len(fractions) == 11
    steps = [b - a for a, b in zip([0.0] + fractions, fractions)]
    assert min(steps) >= 0 and fractions[-1] == 1.0
    assert max(steps) <= 0.15, fractions  # 11 batches of equal work: about 0.09 each
