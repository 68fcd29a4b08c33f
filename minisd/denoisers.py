"""The small networks of chapter 2: what learns p(x) before the U-Net arrives.

A denoiser takes a noisy x_t and its timestep t and predicts the noise ε that was added
(or v, or x0). It needs to know t, because how much noise there is to remove depends on it;
t enters through a sinusoidal embedding, the same one the U-Net uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minisd.errors import MinisdError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, t: (B,) → (B, dim).

    With half = dim / 2 frequencies f_i = max_period^(−i / half), i = 0 … half−1:

        emb = [cos(t·f_0), …, cos(t·f_{half−1}), sin(t·f_0), …, sin(t·f_{half−1})]

    This is the Transformer's position encoding (Vaswani et al. 2017) with cosines first, the
    convention of Stable Diffusion's U-Net (diffusers `get_timestep_embedding` with
    flip_sin_to_cos=True, downscale_freq_shift=0).
    """
    if dim % 2:
        raise MinisdError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().reshape(-1, 1) * freqs.to(t.device).reshape(1, -1)  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeMLP(nn.Module):
    """Sinusoidal embedding followed by a small MLP, as every diffusion network does."""

    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) → (B, out_dim)
        emb = timestep_embedding(t, self.embed_dim)  # float32; cast for float16 or bfloat16 weights
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MLPDenoiser(nn.Module):
    """A residual MLP for points: x_t (B, D) and t (B,) → (B, D)."""

    def __init__(self, data_dim: int = 2, hidden: int = 128, num_blocks: int = 3, time_dim: int = 64):
        super().__init__()
        self.time = TimeMLP(time_dim, hidden)
        self.inp = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)  # (B, hidden)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + temb)  # the timestep is added to every block's input
        return self.out(h)


class ConvBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, plus the timestep added per channel, with a residual."""

    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(time_dim, channels)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) + (B, C, 1, 1): every pixel learns which t it is at
        return h + self.conv(torch.nn.functional.silu(self.norm(h) + self.time(temb)[:, :, None, None]))


class ConvDenoiser(nn.Module):
    """A plain convolutional denoiser: a stack of 3×3 convolutions at full resolution.

    No down-sampling, so through its convolutions each output pixel sees only a
    (2·num_blocks + 5)-pixel-wide window of the input (GroupNorm's per-image statistics are its only
    wider link): enough to clean local noise, not enough to agree on one object across the image.
    Chapter 3's U-Net fixes that. x_t: (B, C, H, W), t: (B,) → (B, C, H, W).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_blocks: int = 6, time_dim: int = 64):
        super().__init__()
        self.time = TimeMLP(time_dim, time_dim)
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(channels, time_dim) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.GroupNorm(min(8, channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(t)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
