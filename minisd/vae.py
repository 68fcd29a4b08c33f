"""The variational autoencoder (Kingma & Welling 2014) that Stable Diffusion works inside (Rombach et al. 2022).

    x (B, 3, 32, 32) ─encoder─▶ mean, log σ² (B, 4, 8, 8) ─sample─▶ z ─decoder─▶ x̂ (B, 3, 32, 32)

Two constraints train it, one term of the loss each:

1. the output matches the input — the **reconstruction** term ‖x̂ − x‖²;
2. the latent distribution is N(0, 1) — the **KL** term KL(q(z | x) ‖ N(0, I)), which pulls every
   posterior towards mean 0 and variance 1, so the latents of all images together fill one smooth
   region around 0 and a random N(0, I) latent decodes to something image-like.

    loss = (1 / D) · [ Σ_pixels (x̂ − x)²  +  β · KL(q(z | x) ‖ N(0, I)) ],   D = C·H·W of the image

(the negative β-ELBO, Higgins et al. 2017). The diffusion model then works on z (here 4·8·8 = 256
numbers per image instead of 3·32·32 = 3072), multiplied by `scale_factor` = 1 / std(z) so that its
latents have unit variance, as Stable Diffusion's 0.18215 does (Rombach et al. 2022, sec. 4.3.2: the
latents are rescaled by 1 / their standard deviation, estimated on a batch of encoded training images).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from minisd.attention import MultiHeadAttention
from minisd.distributed import rows
from minisd.errors import MinisdError, cheap_to_read, check_choice
from minisd.metrics import count_regions, nearest_colour
from minisd.unet import ResBlock  # the U-Net's residual block, without a timestep


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64)  # one per resolution level; len − 1 halvings (32 → 8)
    blocks_per_level: int = 1
    norm_groups: int = 8
    variational: bool = True  # False: a plain autoencoder (the ablation of chapter 6), no log σ²
    scale_factor: float = 1.0  # latents × scale_factor have unit variance; set by `with_scale_factor`
    logvar_min: float = -30.0  # log σ² is clamped to this range, as in Stable Diffusion's VAE
    logvar_max: float = 20.0
    # Options that Stable Diffusion's VAE needs (minisd.convert sets them; the defaults are minisd's own):
    decoder_blocks_per_level: int | None = None  # None: as blocks_per_level (SD's decoder has one more)
    middle: str = "res"  # the block at the lowest resolution: "res" (one residual block) or
    #                      "res-attn-res" (SD: residual block, single-head attention over pixels, residual block)
    downsample_padding: str = "both"  # the stride-2 convs' zero padding: one pixel on "both" sides, or
    #                                   only "after" (right and bottom), as SD's VAE pads
    quant_conv: bool = False  # SD's 1×1 convs: quant_conv on (mean, log σ²), post_quant_conv on z
    norm_eps: float = 1e-5  # GroupNorm ε everywhere (SD: 1e-6)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name in ("in_channels", "latent_channels", "blocks_per_level", "norm_groups"):
            if getattr(self, name) < 1:
                raise MinisdError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.decoder_blocks_per_level is not None and self.decoder_blocks_per_level < 1:
            raise MinisdError(f"decoder_blocks_per_level must be ≥ 1 or None, got {self.decoder_blocks_per_level}")
        check_choice("middle", self.middle, MIDDLES)
        check_choice("downsample_padding", self.downsample_padding, ("both", "after"))
        if not self.channels:
            raise MinisdError("channels must list at least one level, e.g. (16, 32, 64)")
        for c in self.channels:
            if c < 1 or c % self.norm_groups:
                raise MinisdError(f"channel count {c} is not a positive multiple of norm_groups "
                                  f"{self.norm_groups}; use a multiple of {self.norm_groups}")
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise MinisdError(f"scale_factor must be a positive finite number, got {self.scale_factor}")
        if not self.logvar_min < self.logvar_max:
            raise MinisdError(f"logvar_min {self.logvar_min} must be below logvar_max {self.logvar_max}")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def decoder_blocks(self) -> int:
        """Residual blocks per level in the decoder."""
        return self.blocks_per_level if self.decoder_blocks_per_level is None else self.decoder_blocks_per_level


MIDDLES = ("res", "res-attn-res")


def check_beta(beta: float) -> float:
    """β must be a finite number ≥ 0 (0: reconstruction only)."""
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise MinisdError(f"beta must be a finite number ≥ 0, got {beta!r}")
    return float(beta)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), per image.

    mean, logvar: (B, C, h, w); logvar is clamped to [logvar_min, logvar_max] so that exp() stays
    finite. logvar=None gives a point mass at `mean` (a plain autoencoder: std 0, no KL).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None,
                 logvar_min: float = -30.0, logvar_max: float = 20.0):
        self.mean = mean
        self.deterministic = logvar is None
        self.logvar = torch.full_like(mean, -math.inf) if logvar is None else logvar.clamp(logvar_min, logvar_max)

    @property
    def var(self) -> torch.Tensor:
        return self.logvar.exp()

    @property
    def std(self) -> torch.Tensor:
        return (0.5 * self.logvar).exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reparameterisation trick: z = mean + std · ε, ε ~ N(0, I) drawn outside the
        network, so gradients flow to mean and std (Kingma & Welling 2014, sec. 2.4)."""
        if self.deterministic:
            return self.mean
        # `rows`: in data-parallel training, this process's rows of a draw for the whole global batch
        device = generator.device if generator is not None else self.mean.device
        shape, dtype = self.mean.shape, self.mean.dtype
        eps = rows(lambda m: torch.randn((m, *shape[1:]), generator=generator, device=device, dtype=dtype), shape[0])
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, 1)) in closed form, summed over the latent dimensions → (B,):

            KL = ½ Σ (μ² + σ² − 1 − log σ²)      (Kingma & Welling 2014, appendix B)
        """
        return self.kl_per_number().flatten(1).sum(1)

    def kl_per_number(self) -> torch.Tensor:
        """The KL of each latent number, ½ (μ² + σ² − 1 − log σ²), in nats → (B, C, h, w)."""
        if self.deterministic:
            raise MinisdError("a plain autoencoder's latent is a point, not a distribution: it has no KL to N(0, I)")
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)


class VAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W), in [-1, 1] up to the decoder's error (not clamped)
    posterior: DiagonalGaussian
    latents: torch.Tensor  # (B, latent_channels, H/f, W/f): the sample that was decoded (unscaled)


class HalvingConv(nn.Conv2d):
    """A 3×3 stride-2 conv: (B, C, H, W) → (B, C, H/2, W/2). pad="both": one pixel of zeros on
    every side; pad="after": one on the right and bottom only, as Stable Diffusion's VAE does
    (the same output size; each output reads the 3×3 window one input pixel further right and down)."""

    def __init__(self, c: int, pad: str = "both"):
        super().__init__(c, c, 3, stride=2, padding=1 if pad == "both" else 0)
        self.pad_after = pad == "after"

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.pad_after else x)


class PixelAttention(nn.Module):
    """Self-attention over the pixels of a feature map with one head and a residual, as in the
    middle of Stable Diffusion's VAE: GroupNorm → attention → + x. x: (B, C, H, W) → same."""

    def __init__(self, c: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=eps)
        self.attn = MultiHeadAttention(c, heads=1, qkv_bias=True)

    def forward(self, x):
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        return x + rearrange(self.attn(h), "b (h w) c -> b c h w", h=x.shape[2], w=x.shape[3])


def middle(c: VAEConfig, channels: int) -> list[nn.Module]:
    """The block at the lowest resolution, between encoder levels and conv_out (and the decoder's mirror)."""
    res = [ResBlock(channels, channels, None, c.norm_groups, c.norm_eps)]
    if c.middle == "res":
        return res
    return res + [PixelAttention(channels, c.norm_groups, c.norm_eps),
                  ResBlock(channels, channels, None, c.norm_groups, c.norm_eps)]


class Encoder(nn.Module):
    """x (B, in, H, W) → (B, 2·latent, H/f, W/f): mean and log σ² stacked (B, latent, …) for a plain
    autoencoder. Each level: residual blocks, then a stride-2 conv (not after the last level)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.channels
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        layers, prev = [], ch[0]
        for i, width in enumerate(ch):
            for _ in range(c.blocks_per_level):
                layers.append(ResBlock(prev, width, None, c.norm_groups, c.norm_eps))
                prev = width
            if i < len(ch) - 1:
                layers.append(HalvingConv(prev, c.downsample_padding))  # (B, C, H, W) → (B, C, H/2, W/2)
        layers += middle(c, prev)  # at the lowest resolution
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(c.norm_groups, prev, eps=c.norm_eps)
        out = 2 * c.latent_channels if c.variational else c.latent_channels
        self.conv_out = nn.Conv2d(prev, out, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Decoder(nn.Module):
    """z (B, latent, h, w) → (B, in, h·f, w·f): the encoder mirrored, with nearest-neighbour
    doubling + conv in place of the stride-2 convs."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.channels[::-1]
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        layers, prev = middle(c, ch[0]), ch[0]  # the middle block
        for i, width in enumerate(ch):
            for _ in range(c.decoder_blocks):
                layers.append(ResBlock(prev, width, None, c.norm_groups, c.norm_eps))
                prev = width
            if i < len(ch) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(prev, prev, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(c.norm_groups, prev, eps=c.norm_eps)
        self.conv_out = nn.Conv2d(prev, c.in_channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class VAE(nn.Module):
    """Images (B, in_channels, H, W) in [-1, 1] ↔ latents (B, latent_channels, H/f, W/f), f = 2^(levels − 1).

    encode(x) → the posterior q(z | x); decode(z) → x̂. encode_latents / decode_latents are what the
    diffusion model uses: the same, with latents multiplied by `config.scale_factor`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        if config.quant_conv:  # 1×1 convs that mix the latent channels, before sampling and before decoding
            moments = 2 * config.latent_channels if config.variational else config.latent_channels
            self.quant_conv = nn.Conv2d(moments, moments, 1)
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(latent_channels, h, w) of the latents of a square image of side `image_size`."""
        f = self.config.downsampling_factor
        return (self.config.latent_channels, image_size // f, image_size // f)

    def _check(self, x, what: str, channels: int, divisible_by: int) -> None:
        if x.ndim != 4:
            raise MinisdError(f"{what} must have shape (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise MinisdError(f"{what} has {x.shape[1]} channels; this VAE expects {channels}")
        if x.shape[-1] % divisible_by or x.shape[-2] % divisible_by:
            raise MinisdError(f"{what} size {tuple(x.shape[-2:])} is not divisible by {divisible_by}, the VAE's "
                              f"down-sampling factor with {len(self.config.channels)} levels; use a multiple of {divisible_by}")
        if cheap_to_read(x) and not torch.isfinite(x).all():
            raise MinisdError(f"{what} contains NaN or infinite values; pass finite numbers "
                              f"(images in [-1, 1], see minisd.data.normalize)")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, in_channels, H, W) in [-1, 1] → q(z | x) over latents (B, latent_channels, H/f, W/f)."""
        c = self.config
        self._check(x, "image batch", c.in_channels, c.downsampling_factor)
        h = self.encoder(x)
        if c.quant_conv:
            h = self.quant_conv(h)
        if not c.variational:
            return DiagonalGaussian(h, None)
        mean, logvar = h.chunk(2, dim=1)  # (B, latent, h, w) each
        return DiagonalGaussian(mean, logvar, c.logvar_min, c.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z (B, latent_channels, h, w) → images (B, in_channels, h·f, w·f), ≈ [-1, 1], not clamped."""
        self._check(z, "latent batch", self.config.latent_channels, 1)
        return self.decoder(self.post_quant_conv(z) if self.config.quant_conv else z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        posterior = self.encode(x)
        z = posterior.sample(generator)  # the mean itself for a plain autoencoder
        return VAEOutput(self.decode(z), posterior, z)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        """What the diffusion model trains on: a posterior sample (or its mean) × scale_factor."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.config.scale_factor

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (from encode_latents or a diffusion sampler) → images in ≈ [-1, 1]."""
        return self.decode(z / self.config.scale_factor)

    @torch.no_grad()
    def with_scale_factor(self, images: torch.Tensor, batch_size: int = 256,
                          generator: torch.Generator | None = None) -> float:
        """Set config.scale_factor = 1 / std of posterior samples over `images` (uint8, or floats in
        [-1, 1]) and return it — Stable Diffusion's 0.18215 was found the same way (Rombach et al. 2022)."""
        if len(images) < 2:
            raise MinisdError(f"the scale factor needs at least 2 images, got {len(images)}")
        from minisd.data import normalize

        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        zs = []
        for lo in range(0, len(images), batch_size):
            x = images[lo: lo + batch_size]
            x = normalize(x) if x.dtype == torch.uint8 else x.float()
            zs.append(self.encode(x.to(device)).sample(generator).float().cpu())
        self.train(was_training)
        std = torch.cat(zs).std().item()
        if not std > 0:
            raise MinisdError("encoded latents have zero variance; is the VAE trained?")
        self.config = dataclasses.replace(self.config, scale_factor=1.0 / std)
        return self.config.scale_factor

    def save_pretrained(self, folder) -> None:
        from minisd.checkpoint import save_module

        save_module(self, asdict(self.config), folder)

    @classmethod
    def from_pretrained(cls, folder) -> VAE:
        from minisd.checkpoint import load_module

        return load_module(cls, VAEConfig, folder)


def vae_loss(model: VAE, x: torch.Tensor, beta: float, generator: torch.Generator | None = None,
             parts: bool = True):
    """The two-term loss for images x (B, C, H, W) in [-1, 1] → (loss, {"recon": …, "kl": …}).

        loss = recon + β · kl,  recon = mean over images of Σ(x̂ − x)² / D,  kl = mean over images of KL / D

    with D = C·H·W, the number of numbers in one image. Both terms are per image and divided by the
    same D, so their ratio — and so β — means the same at any image size (for a fixed compression),
    and recon is the usual per-pixel MSE. With a Gaussian decoder p(x | z) = N(x̂, σ²I) the
    negative ELBO is Σ(x̂ − x)² / 2σ² + KL + const, so β plays the role of 2σ²: the noise the decoder
    is allowed. For a plain autoencoder (config.variational=False) the loss is recon alone and "kl" is NaN.
    parts=False: return (loss, None) — reading the two terms back as numbers would make the host wait
    for a GPU every step, so training (`vae_train_loss`) leaves them.
    """
    beta = check_beta(beta)
    out = model(x, generator)
    D = x[0].numel()
    recon = (out.reconstruction - x).pow(2).flatten(1).sum(1).mean() / D
    if out.posterior.deterministic:  # a plain autoencoder (asked of the output: `model` may be wrapped)
        return recon, {"recon": recon.item(), "kl": float("nan")} if parts else None
    kl = out.posterior.kl().mean() / D
    return recon + beta * kl, {"recon": recon.item(), "kl": kl.item()} if parts else None


# --- measuring a VAE ------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB of images a, b (N, C, H, W) in [0, 1]: 10·log10(1 / MSE) per
    image. reduction 'mean' → the mean over images (float); 'none' → (N,). 40 dB ≈ an RMS error of
    1 % of the range, 28 dB ≈ 4 %. Capped at 100 dB where the images are equal."""
    check_choice("reduction", reduction, ("mean", "none"))
    if a.shape != b.shape:
        raise MinisdError(f"psnr needs images of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    per_image = 10 * torch.log10(1.0 / mse)
    return per_image if reduction == "none" else per_image.mean().item()


def foreground_mask(images: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """Shapes images (N, 3, S, S), uint8 or floats in [0, 1] → bool (N, S, S): the object's fully
    covered pixels, where the brightest channel is above `threshold` × the image's peak
    (the anti-aliased edge and the black background are left out)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    brightness = x.amax(1)  # (N, S, S)
    peak = brightness.flatten(1).amax(1).clamp(min=1e-6)
    return brightness > threshold * peak.view(-1, 1, 1)


def mean_foreground_colour(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean RGB (N, 3) in [0, 1] of images (N, 3, S, S) over the pixels of mask (N, S, S)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    m = mask.float().unsqueeze(1)  # (N, 1, S, S)
    return (x * m).flatten(2).sum(2) / m.flatten(2).sum(2).clamp(min=1)


def colour_preserved(reconstructions: torch.Tensor, originals: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool (N,): whether the mean colour of each reconstruction (N, 3, S, S) in [0, 1], taken over the
    foreground of the *original* image, is nearest to the true canonical colour (labels[:, 0])."""
    rgb = mean_foreground_colour(reconstructions, foreground_mask(originals))
    return nearest_colour(rgb) == labels[:, 0].to(rgb.device)


def nn_rms(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples (N, C, H, W) in [0, 1] of the RMS pixel difference to the nearest image in
    `reference` (M, C, H, W): how far each sample is from looking like some real image."""
    from minisd.metrics import mean_nn_distance

    d = samples[0].numel()
    return mean_nn_distance(samples.flatten(1), reference.float().flatten(1)) / math.sqrt(d)


def object_checks(images: torch.Tensor, colour_tolerance: float = 0.2,
                  fill_range: tuple[float, float] = (0.35, 1.5)) -> dict[str, torch.Tensor]:
    """Read images (N, 3, S, S), floats in [0, 1] or uint8, by geometry alone (no trained judge): does
    each look like one Shapes object? Returns bool (N,) tensors:

    object        there is something to read: the brightest pixel is above 0.3 (what
                  `minisd.metrics.read_attributes` needs to find an object at all)
    one_region    the object's solid pixels (covered more than half) form exactly one connected region
    shape_fill    it fills its bounding box as a drawn shape does (`minisd.metrics.box_fill` within
                  `fill_range`; drawn Shapes triangles fill about 0.5, circles 0.8, squares 1.0, and all of
                  2,000 test images lie between 0.42 and 1.31, small squares with soft edges the highest)
    one_colour    the mean colour of its core pixels (covered more than 0.7) is within `colour_tolerance`
                  (RGB distance, [0, 1] per channel) of one canonical colour; the two closest canonical
                  colours are 0.46 apart, so 0.2 leaves no doubt which one it is
    clean_object  all four: one object of one canonical colour and a plausible shape

    The limits are set so that every real Shapes image passes (tests/test_vae.py); an all-black image
    has no object, and scattered squiggles or two objects fail `one_region` or `shape_fill`."""
    from minisd.data import COLORS
    from minisd.metrics import _coverage, box_fill

    if images.ndim != 4 or images.shape[1] != 3:
        raise MinisdError(f"object_checks needs RGB images (N, 3, S, S), got {tuple(images.shape)}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # (6, 3)
    N = len(x)
    found, colour_ok, solid = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool), []
    for i, brightness in enumerate(x.amax(1)):  # (S, S) each
        coverage = _coverage(brightness)  # the same coverage `read_attributes` and `box_fill` measure
        if coverage is None:
            solid.append(torch.zeros_like(brightness, dtype=torch.bool))
            continue
        found[i] = True
        solid.append(coverage > 0.5)
        core = coverage > 0.7
        rgb = x[i][:, core].mean(1)  # (3,)
        colour_ok[i] = torch.cdist(rgb[None], palette).min() <= colour_tolerance
    one_region = count_regions(torch.stack(solid)) == 1
    fill = box_fill(x)  # NaN where there is no object
    shape_fill = (fill >= fill_range[0]) & (fill <= fill_range[1])
    return {"object": found, "one_region": one_region & found, "shape_fill": shape_fill & found,
            "one_colour": colour_ok, "clean_object": found & one_region & shape_fill & colour_ok}


@torch.no_grad()
def evaluate_vae(vae: VAE, split: str = "test", num_images: int | None = None, seed: int = 0,
                 image_size: int = 32, num_random: int = 256, batch_size: int = 256) -> dict:
    """Measure a VAE on Shapes images of `split` (all of it by default). Returns a dict:

    psnr_db            mean PSNR (dB, images in [0, 1]) of decode(posterior mean) against the image
    colour_preserved   fraction of images whose reconstruction keeps the true colour (`colour_preserved`)
    kl_per_latent      mean KL(q(z | x) ‖ N(0, 1)) per latent number, in nats (NaN for a plain autoencoder)
    latent_mean, latent_std   of the posterior samples (unscaled) over all images and latent numbers
    scale_factor, latent_shape, num_images
    random_nn_rms      decode `num_random` latents z ~ N(0, I); the mean RMS difference of each to its
                       nearest image of the split (`nn_rms`) …
    real_nn_rms        … and the same for as many real images of the train split, the floor: a random
                       decode that looks like a real Shapes image scores near this, garbage far above
    """
    from minisd.data import Shapes, denormalize, normalize

    device = next(vae.parameters()).device
    vae.eval()
    data = Shapes(split, num_images, image_size=image_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    psnrs, kept, kls, zs = [], [], [], []
    for lo in range(0, len(data), batch_size):
        images = data.images[lo: lo + batch_size]
        posterior = vae.encode(normalize(images).to(device))
        recon = denormalize(vae.decode(posterior.mode())).cpu()
        original = images.float() / 255
        psnrs.append(psnr(recon, original, reduction="none"))
        kept.append(colour_preserved(recon, original, data.labels[lo: lo + batch_size]))
        if not posterior.deterministic:
            kls.append(posterior.kl().cpu())
        zs.append(posterior.sample(g).float().cpu())
    z = torch.cat(zs)
    latent_shape = tuple(z.shape[1:])

    z_random = torch.randn(num_random, *latent_shape, generator=g)
    decoded = torch.cat([denormalize(vae.decode(z_random[lo: lo + batch_size].to(device))).cpu()
                         for lo in range(0, num_random, batch_size)])
    reference = data.images.float() / 255
    real = Shapes("train", num_random, image_size=image_size, seed=seed + 1).images.float() / 255
    return {
        "psnr_db": torch.cat(psnrs).mean().item(),
        "colour_preserved": torch.cat(kept).float().mean().item(),
        "kl_per_latent": torch.cat(kls).mean().item() / z[0].numel() if kls else float("nan"),
        "latent_mean": z.mean().item(),
        "latent_std": z.std().item(),
        "scale_factor": vae.config.scale_factor,
        "latent_shape": latent_shape,
        "num_images": len(data),
        "random_nn_rms": nn_rms(decoded, reference),
        "real_nn_rms": nn_rms(real, reference),
    }


def format_vae_metrics(m: dict) -> str:
    """The dict of `evaluate_vae` as a few readable lines, for printing."""
    c, h, w = m["latent_shape"]
    return "\n".join([
        f"reconstruction: {m['psnr_db']:.1f} dB PSNR, colour preserved in {m['colour_preserved']:.1%} "
        f"of {m['num_images']} images",
        f"latents: {c}×{h}×{w} = {c * h * w} numbers per image; KL {m['kl_per_latent']:.3f} nats per latent "
        f"number; mean {m['latent_mean']:+.3f}, std {m['latent_std']:.3f}; scale factor {m['scale_factor']:.4f}",
        f"random N(0, I) latents decoded: {m['random_nn_rms']:.3f} RMS from the nearest real image "
        f"(real images: {m['real_nn_rms']:.3f})",
    ])


# --- training -------------------------------------------------------------------------------------

def _presets():
    from minisd.train import TrainConfig

    # name → (VAEConfig, TrainConfig, β, number of training images). tiny: seconds, for tests.
    # cpu, measured on 2 CPU cores: train_vae("cpu") in 130 s, then 33.8 dB PSNR on the 5,000 test
    # images with every object's colour kept (chapter 6). gpu: sized for about 40–80 s on one H100/H200
    # (estimated: 5.8 GFLOP per image, 0.74 TFLOP a step, from the kernel time measured there for a
    # 4× wider VAE; issue 15) — not yet trained on a GPU.
    return {
        "tiny": (VAEConfig(channels=(16, 16, 16), norm_groups=8),
                 TrainConfig(steps=25, batch_size=16, lr=3e-3, warmup_steps=5, desc="VAE"), 1e-3, 512),
        "cpu": (VAEConfig(channels=(16, 32, 64)),
                TrainConfig(steps=600, batch_size=32, lr=2e-3, warmup_steps=50, desc="VAE"), 1e-3, 20_000),
        "gpu": (VAEConfig(channels=(32, 64, 64), blocks_per_level=2),
                TrainConfig(steps=2500, batch_size=128, lr=1e-3, warmup_steps=200, desc="VAE"), 1e-3, 50_000),
    }


_PRESETS = _presets()
VAE_PRESETS = {name: p[:3] for name, p in _PRESETS.items()}  # name → (VAEConfig, TrainConfig, β)
PRESET_IMAGES = {name: p[3] for name, p in _PRESETS.items()}  # name → training images drawn by default


def vae_train_loss(beta: float):
    """loss_fn(model, uint8 images, generator) for `minisd.train.train`: `vae_loss` on the normalised batch."""
    from minisd.data import normalize

    return lambda model, images, generator: vae_loss(model, normalize(images), beta, generator, parts=False)[0]


def train_vae(preset: str = "cpu", images: torch.Tensor | None = None, *, beta: float | None = None,
              variational: bool = True, steps: int | None = None, seed: int = 0, device: str = "auto",
              progress: bool = True, config: VAEConfig | None = None, state_file=None,
              train_options: dict | None = None):
    """Train a VAE (or, with variational=False, a plain autoencoder) with `minisd.train.train`.

    images: uint8 (N, C, S, S); by default `PRESET_IMAGES[preset]` Shapes train images of the
    preset's side (`minisd.train.IMAGE_SIZES`: 32, or 64 for 'gpu').
    beta, steps, config: override the preset's. At the end the scale factor is computed on up to
    2048 of the training images and stored in the config. state_file: see `minisd.train.train`
    (resume). train_options: other `TrainConfig` fields, e.g. {"compile": True}.
    Returns (vae, TrainResult).
    """
    from minisd.data import Shapes
    from minisd.train import IMAGE_SIZES, PRESETS, train

    check_choice("preset", preset, PRESETS)
    vae_config, train_config, preset_beta, n_images = VAE_PRESETS[preset] + (PRESET_IMAGES[preset],)
    beta = check_beta(preset_beta if beta is None else beta)
    vae_config = dataclasses.replace(config or vae_config, variational=variational, scale_factor=1.0)
    train_config = dataclasses.replace(train_config, seed=seed, device=device, progress=progress,
                                       **({} if steps is None else {"steps": steps}),
                                       desc="VAE" if variational else "autoencoder", **(train_options or {}))
    if images is None:
        images = Shapes("train", n_images, image_size=IMAGE_SIZES[preset], seed=seed).images
    if images.dtype != torch.uint8:
        raise MinisdError(f"images must be uint8 (N, C, S, S), got {images.dtype}")
    torch.manual_seed(seed)  # the initial weights
    vae = VAE(vae_config)
    result = train(vae, vae_train_loss(beta), images, train_config, state_file=state_file)
    vae.with_scale_factor(images[:2048], generator=torch.Generator().manual_seed(seed))
    return vae, result
