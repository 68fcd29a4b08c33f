"""The VAE: the KL term against closed form and torch.distributions, the reparameterised sample's
statistics, overfitting one batch, the scale factor, save/load, clear errors, and the measures."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from minisd.data import COLORS, Shapes, normalize
from minisd.errors import MinisdError
from minisd.train import TrainConfig, train
from minisd.vae import (
    VAE,
    VAE_PRESETS,
    DiagonalGaussian,
    VAEConfig,
    VAEOutput,
    colour_preserved,
    count_regions,
    evaluate_vae,
    object_checks,
    psnr,
    train_vae,
    vae_loss,
)

SMALL = dict(channels=(8, 16), norm_groups=4)


@pytest.mark.parametrize("config,size,latent", [
    (VAEConfig(), 32, (4, 8, 8)),
    (VAEConfig(**SMALL), 16, (4, 8, 8)),
    (VAEConfig(channels=(8,), norm_groups=8, latent_channels=2), 6, (2, 6, 6)),
    (VAEConfig(channels=(8, 8, 8, 8), norm_groups=8, in_channels=1, blocks_per_level=2), 16, (4, 2, 2)),
    (VAEConfig(**SMALL, variational=False), 16, (4, 8, 8)),
])
def test_shapes_in_and_out(config, size, latent):
    model = VAE(config).eval()
    x = torch.rand(2, config.in_channels, size, size) * 2 - 1
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.posterior.mean.shape == out.latents.shape == (2, *latent)
    assert out.reconstruction.shape == x.shape
    assert model.decode(out.latents).shape == x.shape
    assert config.downsampling_factor == size // latent[-1]
    assert model.latent_shape(size) == latent


def test_default_config_compresses_32x32_shapes_to_4x8x8():
    assert VAE(VAEConfig()).latent_shape(32) == (4, 8, 8)
    assert VAEConfig(channels=[16, 32, 64]).channels == (16, 32, 64)  # tuple fields normalised


def test_kl_equals_the_closed_form_and_torch_distributions():
    # known inputs: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − 1 − log σ²) per number
    mean = torch.tensor([[0.0, 1.0, -2.0, 0.5]]).view(1, 4, 1, 1)
    logvar = torch.tensor([[0.0, 0.0, math.log(4.0), math.log(0.25)]]).view(1, 4, 1, 1)
    expected = 0.5 * ((0 + 1 - 1 - 0) + (1 + 1 - 1 - 0) + (4 + 4 - 1 - math.log(4)) + (0.25 + 0.25 - 1 - math.log(0.25)))
    assert DiagonalGaussian(mean, logvar).kl().item() == pytest.approx(expected, rel=1e-6)
    # random inputs against torch.distributions, summed over the latent dimensions
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    q = DiagonalGaussian(mean, logvar)
    reference = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert q.kl().shape == (3,)
    torch.testing.assert_close(q.kl(), reference, rtol=1e-5, atol=1e-5)
    # N(0, I) itself has KL 0
    assert DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).kl().abs().max() == 0


def test_logvar_is_clamped():
    q = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]]))
    assert q.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(q.var).all() and torch.isfinite(q.kl()).all()


def test_reparameterised_sample_has_the_posteriors_mean_and_variance():
    mean = torch.tensor([-1.0, 0.0, 2.0, 0.5]).view(1, 4, 1, 1).expand(20_000, 4, 1, 1)
    logvar = torch.tensor([0.0, math.log(0.01), math.log(4.0), math.log(0.25)]).view(1, 4, 1, 1).expand(20_000, 4, 1, 1)
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0).flatten(), mean[0].flatten(), atol=0.05, rtol=0)
    torch.testing.assert_close(z.var(0).flatten(), logvar[0].exp().flatten(), rtol=0.05, atol=0)
    # the same generator seed gives the same sample; gradients reach mean and logvar
    assert torch.equal(z, q.sample(torch.Generator().manual_seed(0)))
    m, lv = torch.zeros(2, 1, 1, 1, requires_grad=True), torch.zeros(2, 1, 1, 1, requires_grad=True)
    DiagonalGaussian(m, lv).sample().sum().backward()
    assert m.grad is not None and lv.grad is not None and lv.grad.abs().sum() > 0


def test_a_plain_autoencoder_has_a_point_posterior_and_no_kl():
    model = VAE(VAEConfig(**SMALL, variational=False))
    assert model.encoder.conv_out.out_channels == 4  # no log σ² channels
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    q = model.encode(x)
    assert torch.equal(q.sample(), q.mean) and q.std.abs().max() == 0
    with pytest.raises(MinisdError, match="no KL"):
        q.kl()
    loss, parts = vae_loss(model, x, beta=0.5)
    assert math.isnan(parts["kl"]) and loss.item() == pytest.approx(parts["recon"])


def test_the_loss_is_recon_plus_beta_kl_per_image_number():
    torch.manual_seed(0)
    model = VAE(VAEConfig(**SMALL))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    loss, parts = vae_loss(model, x, beta=0.3, generator=g())
    out = model(x, g())
    D = 3 * 16 * 16
    recon = ((out.reconstruction - x) ** 2).mean()  # Σ per image / D, averaged over images = the MSE
    kl = out.posterior.kl().mean() / D
    assert parts["recon"] == pytest.approx(recon.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(recon.item() + 0.3 * kl.item(), rel=1e-5)


def test_with_beta_zero_a_tiny_vae_overfits_one_batch():
    torch.manual_seed(0)
    x = normalize(Shapes("train", 4, image_size=16, seed=0).images)
    model = VAE(VAEConfig(**SMALL))
    result = train(model, lambda m, b, g: vae_loss(m, b, beta=0.0, generator=g)[0], x,
                   TrainConfig(steps=200, batch_size=4, lr=3e-3, warmup_steps=10, progress=False, device="cpu"))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first / 20, (first, last)
    with torch.no_grad():
        recon = model.decode(model.encode(x).mode())
    assert psnr((recon + 1) / 2, (x + 1) / 2) > 20  # an untrained VAE scores about 5 dB


def test_scale_factor_gives_unit_variance_latents():
    torch.manual_seed(0)
    model = VAE(VAEConfig(**SMALL)).eval()
    with torch.no_grad():  # make the latents far from unit variance: means ×10, σ ≈ 0.05
        model.encoder.conv_out.weight[:4] *= 10
        model.encoder.conv_out.bias[4:] = -6.0
    images = Shapes("train", 256, image_size=16, seed=0).images
    with torch.no_grad():
        before = model.encode_latents(normalize(images)).std().item()
    factor = model.with_scale_factor(images, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert model.config.scale_factor == factor and abs(before - 1) > 0.5
    with torch.no_grad():
        z = model.encode_latents(normalize(images), generator=torch.Generator().manual_seed(1))
        assert z.std().item() == pytest.approx(1.0, rel=0.05)
        # decode_latents undoes the scale: the same images as decoding the unscaled latents
        torch.testing.assert_close(model.decode_latents(z), model.decode(z / factor))


def test_save_and_load_reproduce_outputs_exactly(tmp_path):
    model = VAE(VAEConfig(**SMALL, scale_factor=0.37)).eval()
    model.save_pretrained(tmp_path / "vae")
    again = VAE.from_pretrained(tmp_path / "vae")
    assert again.config == model.config
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x).mean, again.encode(x).mean)
        assert torch.equal(model.encode(x).logvar, again.encode(x).logvar)
        assert torch.equal(model.encode_latents(x, sample=False), again.encode_latents(x, sample=False))
        z = torch.randn(2, 4, 8, 8)
        assert torch.equal(model.decode_latents(z), again.decode_latents(z))
    (tmp_path / "vae" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MinisdError, match="could not be read"):
        VAE.from_pretrained(tmp_path / "vae")


def test_bad_input_gets_clear_errors():
    model = VAE(VAEConfig(**SMALL))
    with pytest.raises(MinisdError, match="has 1 channels; this VAE expects 3"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(MinisdError, match=r"size \(30, 30\) is not divisible by 4.*use a multiple of 4"):
        VAE(VAEConfig()).encode(torch.zeros(1, 3, 30, 30))
    x = torch.zeros(1, 3, 16, 16)
    x[0, 1, 3, 4] = float("nan")
    with pytest.raises(MinisdError, match="NaN"):
        model(x)
    with pytest.raises(MinisdError, match=r"shape \(B, C, H, W\)"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(MinisdError, match="latent batch has 3 channels; this VAE expects 4"):
        model.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(MinisdError, match="NaN"):
        model.decode_latents(torch.full((1, 4, 8, 8), float("inf")))


def test_bad_values_get_clear_errors():
    with pytest.raises(MinisdError, match="beta must be a finite number ≥ 0, got -0.1"):
        vae_loss(VAE(VAEConfig(**SMALL)), torch.zeros(1, 3, 16, 16), beta=-0.1)
    with pytest.raises(MinisdError, match="beta must be"):
        train_vae("tiny", beta=float("nan"))
    with pytest.raises(MinisdError, match="channel count 12 is not a positive multiple of norm_groups 8"):
        VAEConfig(channels=(16, 12))
    with pytest.raises(MinisdError, match="latent_channels must be ≥ 1, got 0"):
        VAEConfig(latent_channels=0)
    with pytest.raises(MinisdError, match="scale_factor must be a positive finite number, got -1"):
        VAEConfig(scale_factor=-1.0)
    with pytest.raises(MinisdError, match="channels must list at least one level"):
        VAEConfig(channels=())
    with pytest.raises(MinisdError, match="unknown preset 'laptop'"):
        train_vae("laptop")
    with pytest.raises(MinisdError, match="must be uint8"):
        train_vae("tiny", torch.rand(4, 3, 32, 32))


def test_psnr_and_colour_check_against_hand_computed_cases():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)  # MSE 0.01 → 20 dB
    assert psnr(a, b) == pytest.approx(20.0, rel=1e-5)
    assert psnr(a, b, reduction="none").tolist() == pytest.approx([20.0, 20.0], rel=1e-5)
    assert psnr(a, a) == pytest.approx(100.0)
    data = Shapes("test", 60, seed=0)
    x = data.images.float() / 255
    assert colour_preserved(x, x, data.labels).all()  # the originals keep their colour
    red, blue = torch.tensor(COLORS["red"]) / 255, torch.tensor(COLORS["blue"]) / 255
    painted = torch.zeros_like(x) + torch.where(data.labels[:, :1, None] == 0, blue, red).view(-1, 3, 1, 1)
    kept = colour_preserved(painted, x, data.labels)  # every object repainted red (the red ones blue)
    assert not kept.any()


def test_presets_and_train_vae_tiny(tmp_path):
    assert set(VAE_PRESETS) == {"tiny", "cpu", "gpu"}
    for config, train_config, beta in VAE_PRESETS.values():
        assert isinstance(config, VAEConfig) and isinstance(train_config, TrainConfig) and beta > 0
        assert VAE(config).latent_shape(32) == (4, 8, 8)
    images = Shapes("train", 64, seed=0).images
    vae, result = train_vae("tiny", images, steps=5, progress=False, device="cpu")
    assert len(result.losses) == 5 and vae.config.scale_factor != 1.0
    m = evaluate_vae(vae, num_images=32, num_random=16)
    for key in ("psnr_db", "colour_preserved", "kl_per_latent", "scale_factor", "latent_shape",
                "random_nn_rms", "real_nn_rms"):
        assert key in m
    assert m["latent_shape"] == (4, 8, 8) and 0 <= m["colour_preserved"] <= 1
    ae, _ = train_vae("tiny", images, steps=3, variational=False, progress=False, device="cpu")
    assert not ae.config.variational and math.isnan(evaluate_vae(ae, num_images=16, num_random=8)["kl_per_latent"])


def _regions_by_flood_fill(mask: list[list[bool]]) -> int:
    """The textbook way: visit every True pixel once, flooding each new region through its 8 neighbours."""
    h, w = len(mask), len(mask[0])
    seen, count = set(), 0
    for start in ((i, j) for i in range(h) for j in range(w) if mask[i][j]):
        if start in seen:
            continue
        count += 1
        stack = [start]
        seen.add(start)
        while stack:
            i, j = stack.pop()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    n = (i + di, j + dj)
                    if 0 <= n[0] < h and 0 <= n[1] < w and mask[n[0]][n[1]] and n not in seen:
                        seen.add(n)
                        stack.append(n)
    return count


def test_count_regions_matches_a_flood_fill():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 12, 12, generator=g) < torch.linspace(0.05, 0.6, 40).view(-1, 1, 1)
    masks[0] = False  # no region at all
    ours = count_regions(masks)
    assert ours.tolist() == [_regions_by_flood_fill(m.tolist()) for m in masks]
    assert ours[0] == 0 and ours.max() > 3
    with pytest.raises(MinisdError, match="bool masks"):
        count_regions(masks.float())


def test_object_checks_pass_every_real_image_and_fail_non_objects():
    for split, seed in (("train", 1), ("test", 0), ("heldout", 0)):
        checks = object_checks(Shapes(split, 300, seed=seed).images)
        assert checks["clean_object"].all(), split
    real = Shapes("test", 64, seed=0)
    x = real.images.float() / 255
    black = object_checks(torch.zeros(1, 3, 32, 32))
    assert not any(v.item() for v in black.values())
    # two objects in one image: two real images at different positions, overlaid
    a, b = next((i, j) for i in range(64) for j in range(64)
                if real.labels[i, 3] == 0 and real.labels[j, 3] == 3 and real.labels[i, 2] == 0 == real.labels[j, 2])
    two = object_checks(torch.maximum(x[a], x[b])[None])
    assert two["object"].item() and not two["clean_object"].item()
    # one object of a colour between two canonical ones: half red, half green → (0.53, 0.47, 0.20)
    red = torch.tensor(COLORS["red"]) / 255
    green = torch.tensor(COLORS["green"]) / 255
    mixed = (x[:1] > 0).float() * ((red + green) / 2).view(1, 3, 1, 1) * x[:1].amax(1, keepdim=True)
    assert not object_checks(mixed)["one_colour"].item()
    # scattered specks: many regions
    specks = torch.zeros(1, 3, 32, 32)
    specks[..., 2::6, 2::6] = 1.0
    assert object_checks(specks)["object"].item() and not object_checks(specks)["clean_object"].item()
    with pytest.raises(MinisdError, match="RGB images"):
        object_checks(x[:, :1])
