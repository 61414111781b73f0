"""Schedule values against the formulas, exact x0 recovery, and the VLB term."""
import math

import numpy as np
import pytest
import torch

from synomaly.method.schedule import DiffusionSchedule, cosine_betas


def test_cosine_betas_match_nichol_dhariwal():
    T = 1000
    f = lambda t: math.cos(((t / T + 0.008) / 1.008) * math.pi / 2) ** 2  # noqa: E731
    betas = cosine_betas(T)
    for t in (0, 1, 250, 500, 998):
        assert betas[t] == pytest.approx(min(1 - f(t + 1) / f(t), 0.999), rel=1e-12)
    assert betas[-1] == 0.999
    abar = np.cumprod(1 - betas)
    assert abar[199] == pytest.approx(f(200) / f(0), rel=1e-6)


def test_linear_schedule_endpoints():
    s = DiffusionSchedule(1000, "linear")
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(s.alphas_cumprod) < 0)


def test_exact_noise_estimate_recovers_x0():
    s = DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 1, 16, 16), generator=g) * 2 - 1
    noise = torch.randn((3, 1, 16, 16), generator=g)
    t = torch.tensor([10, 200, 500])
    x_t = s.q_sample(x0, t, noise)
    assert torch.allclose(s.predict_x0(x_t, t, noise), x0, atol=1e-4)


def test_q_sample_uses_abar():
    s = DiffusionSchedule()
    x0, noise = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert torch.allclose(s.q_sample(x0, 300, noise), torch.full((1, 1, 2, 2), math.sqrt(s.alphas_cumprod[300])))


def test_vlb_is_zero_for_exact_noise_and_grows_with_error():
    s = DiffusionSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((2, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn((2, 1, 8, 8), generator=g)
    t = torch.tensor([100, 300])
    x_t = s.q_sample(x0, t, noise)
    exact = s.vlb_term(x0, x_t, t, noise)
    wrong = s.vlb_term(x0, x_t, t, noise + 0.5)
    assert torch.allclose(exact, torch.zeros(2), atol=1e-5)
    assert torch.all(wrong > 0.001)


def test_timestep_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        DiffusionSchedule(100).q_sample(torch.zeros(1, 1, 2, 2), 100, torch.zeros(1, 1, 2, 2))
