"""Attention from scratch: softmax(QKᵀ/√d)·V, multi-head, and the blocks Stable Diffusion puts in
its U-Net (Vaswani et al. 2017; Rombach et al. 2022, appendix).

Self-attention: queries, keys and values all come from the image features, so every pixel can
look at every other. Cross attention: queries come from the image, keys and values from the text,
so every pixel can look at every word — that is how a caption steers the picture.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minisd.errors import MinisdError, check_choice


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              return_weights: bool = False):
    """Scaled dot-product attention, written out (Vaswani et al. 2017, eq. 1):

        Attention(Q, K, V) = softmax(Q Kᵀ / √d) V

    q: (..., Lq, d), k: (..., Lk, d), v: (..., Lk, dv) → (..., Lq, dv); the same shapes and
    meaning as `F.scaled_dot_product_attention`. `mask` broadcasts to (..., Lq, Lk): boolean
    True = may attend (False entries get weight 0), or a float mask added to the scores.
    With `return_weights`, also returns the attention weights (..., Lq, Lk).
    """
    d = q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., Lq, Lk): how well each query matches each key
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1)  # each row sums to 1
    out = weights @ v  # (..., Lq, dv): a weighted average of the values
    return (out, weights) if return_weights else out


class MultiHeadAttention(nn.Module):
    """Multi-head attention: `heads` attentions side by side, each on its own slice of the channels.

    x: (B, Lq, dim) gives the queries; `context` (B, Lk, context_dim) gives keys and values
    (x itself when None: self-attention). `context_mask` (B, Lk) bool, True for real tokens.
    `attn_mask` bool, broadcastable to (B, heads, Lq, Lk), True = may attend (e.g. a causal mask
    for a text encoder); it combines with `context_mask`.
    Set `fused=True` to use `F.scaled_dot_product_attention` (faster; same result), and
    `store_weights=True` to keep the last attention weights (B, heads, Lq, Lk) in `last_weights`
    for visualisation (this uses the written-out path).
    """

    def __init__(self, dim: int, heads: int = 4, context_dim: int | None = None,
                 qkv_bias: bool = False, fused: bool = False):
        super().__init__()
        if dim % heads:
            raise MinisdError(f"attention dim {dim} is not divisible by heads {heads}; pick heads that divide it")
        self.heads, self.fused, self.store_weights = heads, fused, False
        self.last_weights: torch.Tensor | None = None
        context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(z, "b l (h d) -> b h l d", h=self.heads) for z in (q, k, v))
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()  # (B, 1, 1, Lk)
        if attn_mask is not None:
            mask = attn_mask.bool() if mask is None else mask & attn_mask.bool()
        if self.store_weights:
            out, self.last_weights = attention(q, k, v, mask, return_weights=True)
        elif self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            out = attention(q, k, v, mask)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))  # (B, Lq, dim)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP with a GEGLU gate, as in Stable Diffusion's U-Net
    (Shazeer 2020): out(a · GELU(gate)), where a and gate are the two halves of proj(x)."""

    def __init__(self, dim: int, mult: int = 4, inner: int | None = None):
        super().__init__()
        inner = dim * mult if inner is None else inner
        self.proj = nn.Linear(dim, inner * 2)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · σ(1.702 x): OpenAI CLIP's cheap approximation of GELU (what SD 1.x's text encoder uses)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}
FEED_FORWARDS = ("geglu", *ACTIVATIONS)  # "geglu": the gated FeedForward; otherwise an MLP with that activation


class MLP(nn.Module):
    """The plain feed-forward of CLIP's text tower: fc1 → activation → fc2. x: (B, L, dim) → same."""

    def __init__(self, dim: int, inner: int, activation: str = "gelu"):
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, dim)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Self-attention → cross attention → feed-forward, each with a LayerNorm before it and a
    residual around it. Without a `context_dim` the cross-attention layer is left out.
    x: (B, L, dim), context: (B, Lk, context_dim); `self_mask` (bool, broadcastable to
    (B, heads, L, L)) limits what the self-attention may see, e.g. a causal mask.

    The defaults are Stable Diffusion's U-Net block. CLIP's text tower differs in three places:
    `feed_forward` "quick_gelu" or "gelu" (a plain MLP of width `ff_dim`, default 4·dim, instead
    of the GEGLU gate) and `qkv_bias=True`; `norm_eps` is the LayerNorms' ε."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, fused: bool = False, *,
                 feed_forward: str = "geglu", ff_dim: int | None = None, qkv_bias: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        check_choice("feed_forward", feed_forward, FEED_FORWARDS)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = MultiHeadAttention(dim, heads, qkv_bias=qkv_bias, fused=fused)
        self.attn2 = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = MultiHeadAttention(dim, heads, context_dim=context_dim, qkv_bias=qkv_bias, fused=fused)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        ff_dim = 4 * dim if ff_dim is None else ff_dim
        self.ff = FeedForward(dim, inner=ff_dim) if feed_forward == "geglu" else MLP(dim, ff_dim, feed_forward)

    def forward(self, x, context=None, context_mask=None, self_mask=None):
        x = x + self.attn1(self.norm1(x), attn_mask=self_mask)  # every position looks at every other
        if self.attn2 is not None:
            if context is None:
                raise MinisdError("this block was built with a context_dim and needs a context")
            x = x + self.attn2(self.norm2(x), context, context_mask)  # every position looks at the text
        return x + self.ff(self.norm3(x))


PROJECTIONS = ("conv", "linear")


class SpatialTransformer(nn.Module):
    """A transformer over a feature map, the block Stable Diffusion inserts in its U-Net:
    GroupNorm → 1×1 conv → flatten pixels to a sequence → TransformerBlock → back → 1×1 conv,
    with a residual around it all. x: (B, C, H, W) → (B, C, H, W).

    projection="linear" (SD 2.x) flattens first and uses Linear layers on the sequence for the
    two projections; a 1×1 conv is the same map, so only the weights' shape differs.
    `norm_eps` is the GroupNorm's ε (Stable Diffusion: 1e-6)."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None,
                 groups: int = 8, fused: bool = False, *, projection: str = "conv", norm_eps: float = 1e-5):
        super().__init__()
        check_choice("projection", projection, PROJECTIONS)
        self.norm = nn.GroupNorm(groups, channels, eps=norm_eps)
        self.linear = projection == "linear"
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.block = TransformerBlock(channels, heads, context_dim, fused)
        self.proj_out = proj()

    def forward(self, x, context=None, context_mask=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))  # (B, HW, C): one token per pixel
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")  # (B, HW, C): one token per pixel
        h = self.block(h, context, context_mask)
        if self.linear:
            return x + rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=H, w=W))


def set_attention_options(model: nn.Module, *, fused: bool | None = None,
                          store_weights: bool | None = None) -> None:
    """Switch every attention layer in `model` to the fused kernel, or to keeping its weights."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            if fused is not None:
                m.fused = fused
            if store_weights is not None:
                m.store_weights = store_weights
                m.last_weights = None
