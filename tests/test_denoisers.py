"""Chapter 2's networks: the timestep embedding against its formula and against diffusers."""

import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from minisd.denoisers import ConvDenoiser, MLPDenoiser, timestep_embedding
from minisd.errors import MinisdError


def test_timestep_embedding_matches_its_formula():
    t = torch.tensor([0, 1, 17, 999])
    dim, half = 8, 4
    emb = timestep_embedding(t, dim)
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            f = 10_000 ** (-i / half)
            assert math.isclose(emb[b, i].item(), math.cos(tb * f), abs_tol=1e-5)
            assert math.isclose(emb[b, half + i].item(), math.sin(tb * f), abs_tol=1e-5)


def test_timestep_embedding_matches_stable_diffusions_convention_in_diffusers():
    t = torch.arange(0, 1000, 37)
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), ref, atol=1e-5, rtol=1e-5)


def test_odd_embedding_dim_is_rejected():
    with pytest.raises(MinisdError, match="even, got 7"):
        timestep_embedding(torch.tensor([1]), 7)


def test_denoisers_keep_the_input_shape_and_use_t():
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    net = ConvDenoiser(channels=16, num_blocks=2)
    out = net(x, t)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, torch.tensor([999, 0, 500])))  # depends on t
    p = torch.randn(5, 2)
    assert MLPDenoiser()(p, torch.arange(5)).shape == (5, 2)
