"""Attention written out, against PyTorch's fused kernel and nn.MultiheadAttention."""

import pytest
import torch
import torch.nn.functional as F

from minisd.attention import (
    MultiHeadAttention,
    SpatialTransformer,
    attention,
    set_attention_options,
)
from minisd.errors import MinisdError


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g),
            torch.randn(2, 3, 7, 6, generator=g))


def test_attention_equals_scaled_dot_product_attention(qkv):
    q, k, v = qkv
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_with_boolean_and_float_masks_equals_sdpa(qkv):
    q, k, v = qkv
    g = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(2, 1, 5, 7, generator=g) > 0.4
    bool_mask[..., 0] = True  # every query may attend somewhere
    float_mask = torch.randn(5, 7, generator=g)
    for mask in (bool_mask, float_mask):
        torch.testing.assert_close(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   atol=1e-5, rtol=1e-5)
    out, w = attention(q, k, v, bool_mask, return_weights=True)
    assert w.shape == (2, 3, 5, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    assert (w[~bool_mask.expand_as(w)] == 0).all()


def test_attention_by_hand_on_a_tiny_example():
    # one query that matches the second key far better than the first: the output is ≈ the second value
    q = torch.tensor([[[0.0, 10.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    w = torch.softmax(torch.tensor([0.0, 10.0]) / 2**0.5, 0)
    torch.testing.assert_close(attention(q, k, v)[0, 0], w[0] * v[0, 0] + w[1] * v[0, 1])


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_multi_head_attention_equals_torch_multihead_attention(cross, masked):
    torch.manual_seed(0)
    dim, heads, cdim = 16, 4, (12 if cross else 16)
    ours = MultiHeadAttention(dim, heads, context_dim=cdim, qkv_bias=True)
    ref = torch.nn.MultiheadAttention(dim, heads, batch_first=True, kdim=cdim, vdim=cdim)
    with torch.no_grad():
        if cross:
            ref.q_proj_weight.copy_(ours.to_q.weight)
            ref.k_proj_weight.copy_(ours.to_k.weight)
            ref.v_proj_weight.copy_(ours.to_v.weight)
        else:
            ref.in_proj_weight.copy_(torch.cat([ours.to_q.weight, ours.to_k.weight, ours.to_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.to_q.bias, ours.to_k.bias, ours.to_v.bias]))
        ref.out_proj.weight.copy_(ours.to_out.weight)
        ref.out_proj.bias.copy_(ours.to_out.bias)
    x = torch.randn(3, 9, dim)
    ctx = torch.randn(3, 6, cdim) if cross else x
    keep = torch.ones(3, ctx.shape[1], dtype=torch.bool)
    if masked:
        keep[0, 4:] = False
        keep[2, 1:] = False
    expected, _ = ref(x, ctx, ctx, key_padding_mask=~keep if masked else None)  # torch: True = ignore
    for fused in (False, True):
        ours.fused = fused
        got = ours(x, ctx if cross else None, keep if masked else None)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stored_weights_for_visualisation_and_option_switch():
    block = SpatialTransformer(16, heads=2, context_dim=8, groups=4)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    plain = block(x, ctx)
    set_attention_options(block, fused=True)
    torch.testing.assert_close(block(x, ctx), plain, atol=1e-5, rtol=1e-5)
    set_attention_options(block, store_weights=True)
    torch.testing.assert_close(block(x, ctx), plain, atol=1e-5, rtol=1e-5)
    cross = block.block.attn2.last_weights
    assert cross.shape == (2, 2, 16, 5)  # (B, heads, pixels, text tokens)
    assert block.block.attn1.last_weights.shape == (2, 2, 16, 16)


def test_bad_head_count_and_missing_context():
    with pytest.raises(MinisdError, match="dim 10 is not divisible by heads 4"):
        MultiHeadAttention(10, 4)
    with pytest.raises(MinisdError, match="needs a context"):
        SpatialTransformer(8, 2, context_dim=4, groups=4)(torch.randn(1, 8, 2, 2))


@pytest.mark.parametrize("fused", [False, True])
def test_a_causal_self_mask_equals_sdpa_is_causal(fused):
    """The text encoder's causal mask: token i sees tokens 0 … i only."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, heads=4, fused=fused)
    x = torch.randn(2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    q, k, v = (t.view(2, 6, 4, 4).transpose(1, 2) for t in (mha.to_q(x), mha.to_k(x), mha.to_v(x)))
    expected = mha.to_out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 16))
    assert torch.allclose(mha(x, attn_mask=causal), expected, atol=1e-5)
    # combined with a padding mask on the keys: the last two tokens are hidden from everyone
    pad = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    out = mha(x, context_mask=pad, attn_mask=causal)
    assert torch.allclose(out[:, :4], expected[:, :4], atol=1e-5)
