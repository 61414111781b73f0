"""A compact 2D diffusion UNet: residual blocks with timestep embedding, attention at low resolutions.

Same design as the DDPM/guided-diffusion UNet (and MONAI's DiffusionModelUNet), sized for CPU
inference; the configuration is a plain dict stored in the model file so weights load without code.
"""
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: Tuple[int, ...] = (16, 8)
    num_heads: int = 4
    image_size: int = 128
    dropout: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("channel_mult", "attention_resolutions"):
            if key in known:
                known[key] = tuple(int(v) for v in known[key])
        return cls(**known)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    groups = min(32, channels // 4) if channels >= 8 else 1
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} group-norm groups")
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.heads = max(1, min(num_heads, channels // 8))
        if channels % self.heads:
            raise ValueError(f"{channels} channels cannot be split into {self.heads} attention heads")
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Predicts the noise of x_t given t; input and output (B, C, S, S) with S divisible by 2**(levels-1)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]
        res = config.image_size
        cur = ch
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, config.dropout)])
                cur = ch * mult
                if res in config.attention_resolutions:
                    block.append(Attention(cur, config.num_heads))
                self.down.append(block)
                skips.append(cur)
            if level != len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, config.dropout), Attention(cur, config.num_heads),
                                  ResBlock(cur, cur, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, config.dropout)])
                cur = ch * mult
                if res in config.attention_resolutions:
                    block.append(Attention(cur, config.num_heads))
                if level != 0 and i == config.num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
                self.up.append(block)
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, config.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def _run(block, h, emb):
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def config_problem(config: UNetConfig) -> Optional[str]:
    """Why a network of this configuration cannot be built, or None. Built on the meta device (no
    memory, no weights), so the check is the construction code itself and cannot drift from it."""
    levels = len(config.channel_mult)
    if levels < 1 or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in config.channel_mult):
        return f"channel multipliers must be whole numbers of at least 1, got {list(config.channel_mult)}."
    factor = 2 ** (levels - 1)
    if config.image_size % factor:
        below = max(factor, config.image_size // factor * factor)
        return (f"image size {config.image_size} does not suit the network's {levels} levels: it must be a "
                f"multiple of {factor} (e.g. {below} or {below + factor}).")
    problem = _build_problem(config)
    if problem:
        fitting = [c for c in (8, 16, 32, 64) if not _build_problem(replace(config, base_channels=c))]
        suggestion = f"use e.g. {' or '.join(map(str, fitting))}" if fitting else "use a multiple of 32"
        return f"base channels {config.base_channels} do not suit the network ({problem}); {suggestion}."
    return None


def _build_problem(config: UNetConfig) -> Optional[str]:
    try:
        with torch.device("meta"):
            UNet(config)
    except ValueError as exc:
        return str(exc)
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
