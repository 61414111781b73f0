"""The diffusion schedule: betas, forward noising, one-step x0 prediction and the VLB term.

Kept apart from the network (as in the diffusers schedulers): it holds no weights, only the
closed-form quantities of a DDPM with T steps.
"""
import math

import numpy as np
import torch


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal: f(t) = cos(((t/T + s)/(1 + s)) * pi/2)^2, beta_t = min(1 - f(t+1)/f(t), max_beta)."""
    def f(t):
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)], dtype=np.float64)


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al. linear schedule, scaled so any T spans the same noise range as T = 1000."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_nll(x, mean, log_scale):
    """NLL of x in [-1, 1] under a Gaussian discretised to 256 bins (Ho et al., decoder at t = 0)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
    return -log_probs


class DiffusionSchedule:
    """Closed-form DDPM quantities for ``num_steps`` steps of a cosine or linear beta schedule."""

    def __init__(self, num_steps: int = 1000, kind: str = "cosine"):
        if kind not in ("cosine", "linear"):
            raise ValueError(f"unknown schedule {kind!r}; choose 'cosine' or 'linear'")
        self.num_steps = int(num_steps)
        self.kind = kind
        betas = cosine_betas(num_steps) if kind == "cosine" else linear_betas(num_steps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self._t = {
            "sqrt_abar": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_abar": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_abar": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_abar": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "post_var": posterior_var,
            "post_logvar": np.log(np.append(posterior_var[1], posterior_var[1:])),
            "post_c0": betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            "post_ct": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }

    def to_dict(self) -> dict:
        return {"num_steps": self.num_steps, "kind": self.kind}

    def _get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = torch.as_tensor(self._t[name], dtype=torch.float32, device=like.device)[t.long().to(like.device)]
        return values.view(-1, *([1] * (like.dim() - 1)))

    def _timesteps(self, t, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device).long()
        if t.dim() == 0:
            t = t.expand(batch)
        if torch.any(t < 0) or torch.any(t >= self.num_steps):
            raise ValueError(f"timestep out of range [0, {self.num_steps})")
        return t

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        t = self._timesteps(t, x0.shape[0], x0.device)
        return self._get("sqrt_abar", t, x0) * x0 + self._get("sqrt_one_minus_abar", t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """One-step counterfactual: sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clamped to [-1, 1]."""
        t = self._timesteps(t, x_t.shape[0], x_t.device)
        x0 = self._get("sqrt_recip_abar", t, x_t) * x_t - self._get("sqrt_recipm1_abar", t, x_t) * eps
        return x0.clamp(-1.0, 1.0) if clip else x0

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x0)."""
        t = self._timesteps(t, x0.shape[0], x0.device)
        mean = self._get("post_c0", t, x0) * x0 + self._get("post_ct", t, x0) * x_t
        return mean, self._get("post_logvar", t, x0)

    def vlb_term(self, x0: torch.Tensor, x_t: torch.Tensor, t, eps_pred: torch.Tensor) -> torch.Tensor:
        """Per-image VLB term in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0.

        The network predicts epsilon only, so p uses the posterior variance (fixed-variance DDPM).
        """
        t = self._timesteps(t, x0.shape[0], x0.device)
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        model_mean, model_logvar = self.q_posterior(self.predict_x0(x_t, t, eps_pred, clip=False), x_t, t)
        kl = _normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
        nll = _discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)
