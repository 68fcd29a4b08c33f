"""The U-Net (Ronneberger et al. 2015) as diffusion models use it (Ho et al. 2020; Rombach et al. 2022).

    x_t ─conv_in─▶ [level 0] ─down─▶ [level 1] ─down─▶ … ─▶ middle ─▶ … ─up─▶ [level 1] ─up─▶ [level 0] ─conv_out─▶ ε̂
                      │                  │                                     ▲                  ▲
                      └──────────────────┼──────────── skip ───────────────────┼──────────────────┘
                                         └──────────── skip ───────────────────┘

The down path halves the resolution at each level, so deep features see the whole image but lose
detail; the up path restores the resolution, and the skip connections hand each up block the
features of the same resolution from the down path — the detail the bottleneck lost. The timestep
enters every residual block; text enters through cross attention at the levels that have it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minisd.attention import PROJECTIONS, SpatialTransformer
from minisd.denoisers import TimeMLP, timestep_embedding  # noqa: F401  (the embedding lives with chapter 2)
from minisd.errors import MinisdError, check_choice


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one per level; level i has base · mult[i] channels
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (1,)  # levels (0 = full resolution) with a transformer block
    heads: int | tuple[int, ...] = 4  # attention heads; a tuple gives one per level (the middle uses the last)
    context_dim: int | None = None  # set to condition on text tokens through cross attention
    extra_in_channels: int = 0  # set to condition by concatenating maps to the input
    skip_connections: bool = True  # False only for the ablation: the skips then carry zeros
    norm_groups: int = 8
    fused_attention: bool = False
    # Options that Stable Diffusion's U-Net needs (minisd.convert sets them; the defaults are minisd's own):
    projection: str = "conv"  # transformer proj_in/proj_out: "conv" (1×1 convs, SD 1.x) or "linear" (SD 2.x)
    norm_eps: float = 1e-5  # GroupNorm ε of the residual blocks and the output
    attention_norm_eps: float = 1e-5  # GroupNorm ε at the entry of each transformer block (SD: 1e-6)

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if not isinstance(self.heads, int):  # a list, as read back from config.json
            object.__setattr__(self, "heads", tuple(self.heads))
        if not self.channel_mults or self.blocks_per_level < 1:
            raise MinisdError("a U-Net needs at least one level and one block per level")
        check_choice("projection", self.projection, PROJECTIONS)
        if isinstance(self.heads, tuple) and len(self.heads) != len(self.channel_mults):
            raise MinisdError(f"heads {self.heads} must give one count per level ({len(self.channel_mults)} "
                              f"levels), or be one integer for all")
        for level, mult in enumerate(self.channel_mults):
            c, heads = self.base_channels * mult, self.level_heads(level)
            if c % self.norm_groups:
                raise MinisdError(f"channel count {c} (base_channels {self.base_channels} × {mult}) is not "
                                  f"divisible by norm_groups {self.norm_groups}; use a multiple of {self.norm_groups}")
            if heads < 1:
                raise MinisdError(f"heads must be ≥ 1, got {self.heads}")
            if self.attention_levels and c % heads:
                raise MinisdError(f"channel count {c} is not divisible by heads {heads}")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mults)]
        if bad:
            raise MinisdError(f"attention level {bad[0]} does not exist; levels are 0 … {len(self.channel_mults) - 1}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def level_heads(self, level: int) -> int:
        """The number of attention heads at `level` (−1: the deepest, which the middle block uses)."""
        return self.heads if isinstance(self.heads, int) else self.heads[level]


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + timestep, GroupNorm → SiLU → conv, with a residual (1×1 conv when
    the channel count changes). x: (B, C_in, H, W), temb: (B, T) → (B, C_out, H, W).
    With time_dim=None there is no timestep (the VAE's block). `eps` is the GroupNorms' ε."""

    def __init__(self, c_in: int, c_out: int, time_dim: int | None, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in, eps=eps), nn.Conv2d(c_in, c_out, 3, padding=1)
        if time_dim is not None:
            self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out, eps=eps), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time(F.silu(temb))[:, :, None, None]  # the timestep, added to every pixel
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):  # (B, C, H, W) → (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) → (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks of one resolution, each optionally followed by a transformer block."""

    def __init__(self, c_ins: list[int], c_out: int, config: UNetConfig, time_dim: int, attend: bool, heads: int):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, c_out, time_dim, config.norm_groups, config.norm_eps) for c in c_ins)
        self.attn = nn.ModuleList(transformer(c_out, heads, config) if attend else nn.Identity() for _ in c_ins)


def transformer(channels: int, heads: int, c: UNetConfig) -> SpatialTransformer:
    return SpatialTransformer(channels, heads, c.context_dim, c.norm_groups, c.fused_attention,
                              projection=c.projection, norm_eps=c.attention_norm_eps)


class UNet(nn.Module):
    """x_t (B, in_channels, H, W), t (B,), optional context (B, L, context_dim) and its mask (B, L),
    optional extra (B, extra_in_channels, H, W) → (B, out_channels, H, W).
    H and W must be divisible by 2^(levels − 1)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        chans = [c.base_channels * m for m in c.channel_mults]
        time_dim = 4 * c.base_channels
        self.time = TimeMLP(c.base_channels, time_dim)
        self.conv_in = nn.Conv2d(c.in_channels + c.extra_in_channels, chans[0], 3, padding=1)

        # Down path: remember the channel count of every feature map pushed onto the skip stack.
        skip_chans, ch = [chans[0]], chans[0]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, c_out in enumerate(chans):
            ins = [ch] + [c_out] * (c.blocks_per_level - 1)
            self.down.append(Level(ins, c_out, c, time_dim, i in c.attention_levels, c.level_heads(i)))
            skip_chans += [c_out] * c.blocks_per_level
            ch = c_out
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skip_chans.append(ch)

        self.mid1 = ResBlock(ch, ch, time_dim, c.norm_groups, c.norm_eps)
        self.mid_attn = transformer(ch, c.level_heads(-1), c)
        self.mid2 = ResBlock(ch, ch, time_dim, c.norm_groups, c.norm_eps)

        # Up path: each block takes its input concatenated with one skip, so it has one more block.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            c_out = chans[i]
            ins = []
            for _ in range(c.blocks_per_level + 1):
                ins.append(ch + skip_chans.pop())
                ch = c_out
            self.up.append(Level(ins, c_out, c, time_dim, i in c.attention_levels, c.level_heads(i)))
            self.upsample.append(Upsample(ch) if i > 0 else nn.Identity())
        assert not skip_chans, "every skip must be consumed"

        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, x, t, context=None, context_mask=None, extra=None):
        c = self.config
        f = c.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise MinisdError(f"image size {tuple(x.shape[-2:])} is not divisible by {f}, the U-Net's "
                              f"down-sampling factor with {len(c.channel_mults)} levels; resize or use fewer levels")
        if x.shape[1] != c.in_channels:
            raise MinisdError(f"input has {x.shape[1]} channels; this U-Net expects {c.in_channels}")
        if c.extra_in_channels:
            if extra is None or extra.shape[1] != c.extra_in_channels:
                raise MinisdError(f"this U-Net concatenates {c.extra_in_channels} extra input channels; pass extra=")
            x = torch.cat([x, extra], dim=1)  # conditioning way 1: concatenate to the input
        temb = self.time(t)  # (B, 4·base)

        h = self.conv_in(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = self._attend(attn, res(h, temb), context, context_mask)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)

        h = self.mid2(self._attend(self.mid_attn, self.mid1(h, temb), context, context_mask), temb)

        for level, up in zip(self.up, self.upsample):
            for res, attn in zip(level.res, level.attn):
                skip = skips.pop()
                if not c.skip_connections:
                    skip = torch.zeros_like(skip)  # ablation: same shapes, no information
                h = torch.cat([h, skip], dim=1)  # ← the skip connection joins here
                h = self._attend(attn, res(h, temb), context, context_mask)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _attend(attn, h, context, context_mask):
        # conditioning way 2: cross attention to the text inside the transformer blocks
        return h if isinstance(attn, nn.Identity) else attn(h, context, context_mask)

    def save_pretrained(self, folder) -> None:
        from minisd.checkpoint import save_module

        save_module(self, asdict(self.config), folder)

    @classmethod
    def from_pretrained(cls, folder) -> UNet:
        from minisd.checkpoint import load_module

        return load_module(cls, UNetConfig, folder)


def shape_trace(model: UNet, x, t, context=None) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) for every residual, attention, down and up block, in the order
    they run — the table chapter 3 prints."""
    rows, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, (ResBlock, SpatialTransformer, Downsample, Upsample)) or name in ("conv_in", "conv_out"):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: rows.append((name, tuple(out.shape)))))
    try:
        with torch.no_grad():
            model(x, t, context)
    finally:
        for h in hooks:
            h.remove()
    return rows
