"""`minisd bench`: speed figures measured on this machine, printed as a table and written as JSON.

Suites:
    explorer   the chapter-8 denoising explorer with a model: how long pressing Run takes for a
               50-step guided run (sampling, decoding every step, drawing), and how long moving
               the step slider takes to redraw (each position timed once).
    unet       U-Net training-step throughput: minisd's `UNet` against diffusers'
               `UNet2DConditionModel` built to the same configuration (same parameter count),
               same inputs, loss and AdamW step, timed alternately; eager and `torch.compile`d.
    sampling   64 images, 50 DDIM steps at guidance 4: the shipped `cpu` model, and the `gpu`
               preset's components with random weights (speed only).
    latent     latent against pixel diffusion at the same image size: training step and sampling.
    attention  the written-out attention against the fused kernel: in the U-Net and alone.
    switches   the speed switches one at a time on top of eager float32 with plain AdamW:
               channels-last, fused AdamW, torch.compile, bf16 autocast (CUDA).
    mfu        FLOPs of one U-Net training step (FlopCounterMode) over its measured time; on
               CUDA also the model FLOPs utilisation against the card's peak dense bf16 rate.
    host       per training step of each stage, the host time of the training loop: everything
               but the networks' own work (the loop, the loss, random draws, captions, AdamW,
               clipping, EMA, launches, syncs), with stand-in networks at the `gpu` preset's batch
               sizes unless --preset is given, and what it is made of (see `minisd.bench_host`).

Every figure is a row {what, value, unit, target (or None), higher_is_better, note}. Times are
medians over `repeats` timed runs after warm-up; wall-clock on the CPU threads torch uses here
(`torch.get_num_threads()`), or with the GPU synchronised on CUDA. Throughputs (images/s) are
measured on blocks of training steps, the compared models' blocks taking turns.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minisd.errors import MinisdError, check_choice, check_count

SUITES = ("explorer", "unet", "sampling", "latent", "attention", "switches", "mfu", "host")
EXPLORER_TARGETS = {"run_seconds": 10.0, "redraw_seconds": 0.3}  # issue 7: 50 guided steps; one slider move
UNET_RATIO_TARGETS = {"cpu": 1.0, "cuda": 1.2}  # minisd / diffusers images/s, eager (cpu: the cpu preset)
SAMPLING_TARGET_SECONDS = 10.0  # 64 images, 50 guided DDIM steps, the shipped cpu model
PARAM_TOLERANCE = 0.05  # minisd's and diffusers' U-Nets must agree this closely in parameter count
# Peak dense bf16 tensor-core rates, FLOP/s, by (a part of) the name torch reports; first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 SXM", 989.4e12), ("H100 80GB HBM3", 989.4e12),
                   ("H200", 989.4e12), ("A100", 312e12))
PROMPT = "a large red circle in the center"


def row(what: str, value, unit: str, target: float | None = None, higher_is_better: bool = True,
        note: str = "") -> dict:
    """One figure of the table and the JSON."""
    return {"what": what, "value": value, "unit": unit, "target": target,
            "higher_is_better": higher_is_better, "note": note}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- what every suite shares -------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """How to measure: the preset whose sizes are used, the device, whether to add compiled rows,
    `quick` (tests: few steps, few images) and the number of timed runs per measure."""
    preset: str = "cpu"
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    compile: bool = True
    quick: bool = False
    repeats: int = 3
    run: str = "shapes-cpu"
    host_preset: str = "gpu"  # the host suite's preset: gpu unless one is named

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def steps(self) -> int:
        """Training steps in one timed block."""
        return 2 if self.quick else (20 if self.cuda else 5)

    @property
    def dtype_note(self) -> str:
        return "bf16 autocast" if self.cuda else "float32"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The U-Net of a preset as the pipeline builds it, and its training inputs' sizes."""
    preset: str
    unet: object  # UNetConfig with in/out channels from the VAE and context_dim from the text encoder
    batch: int  # the U-Net's training batch size
    side: int  # latent side = image side / the VAE's down-sampling factor
    image_size: int
    context_length: int  # the text encoder's max_length
    vae: object  # VAEConfig
    text: object  # TextEncoderConfig

    @property
    def largest_attention_side(self) -> int:
        return self.side // 2 ** min(self.unet.attention_levels)


def preset_sizes(preset: str) -> Sizes:
    """Read the preset's configs now (they may change), the way `train_unet` combines them."""
    from minisd.clip import clip_presets
    from minisd.pipeline import unet_presets
    from minisd.train import IMAGE_SIZES, PRESETS
    from minisd.vae import VAE_PRESETS

    check_choice("preset", preset, PRESETS)
    unet_config, train_config, _ = unet_presets()[preset]
    vae_config, text_config = VAE_PRESETS[preset][0], clip_presets()[preset][0].text
    unet_config = dataclasses.replace(unet_config, in_channels=vae_config.latent_channels,
                                      out_channels=vae_config.latent_channels, context_dim=text_config.width)
    image_size = IMAGE_SIZES[preset]
    return Sizes(preset, unet_config, train_config.batch_size, image_size // vae_config.downsampling_factor,
                 image_size, text_config.max_length, vae_config, text_config)


def training_inputs(config, batch: int, side: int, context_length: int, device, seed: int = 0) -> dict:
    """x, t, context, mask (captions of 4 … L tokens) and a fixed target, seeded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, context_length + 1, (batch,), generator=g)
    inputs = {"x": torch.randn(batch, config.in_channels, side, side, generator=g),
              "t": torch.randint(0, 1000, (batch,), generator=g),
              "context": torch.randn(batch, context_length, config.context_dim, generator=g),
              "mask": torch.arange(context_length)[None, :] < lengths[:, None],
              "target": torch.randn(batch, config.out_channels, side, side, generator=g)}
    return {k: v.to(device) for k, v in inputs.items()}


def _need_diffusers():
    try:
        import diffusers
    except ImportError:
        raise MinisdError("the unet suite compares against diffusers, which is not installed; "
                          "`pip install diffusers` (it comes with minisd's dev extra)") from None
    return diffusers


def diffusers_unet(config, sample_size: int):
    """diffusers' `UNet2DConditionModel` built to the same configuration as minisd's `UNet(config)`:
    the same levels, blocks, attention levels, heads, norm groups and time embedding width."""
    from diffusers import UNet2DConditionModel

    _need_diffusers()
    levels = range(len(config.channel_mults))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in config.attention_levels else "DownBlock2D"
                               for i in levels),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if i in config.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mults),
        layers_per_block=config.blocks_per_level, norm_num_groups=config.norm_groups,
        cross_attention_dim=config.context_dim,
        attention_head_dim=config.heads,  # diffusers' legacy name: this is the number of heads
        time_embedding_dim=4 * config.base_channels, flip_sin_to_cos=True, freq_shift=0)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_param_counts(ours: int, theirs: int, tolerance: float = PARAM_TOLERANCE) -> None:
    if abs(ours - theirs) > tolerance * ours:
        raise MinisdError(f"the diffusers U-Net has {theirs:,} parameters and minisd's {ours:,}: more than "
                          f"{tolerance:.0%} apart, so they are not the same model; fix the mapping")


def call_minisd(model, inp):
    return model(inp["x"], inp["t"], inp["context"], inp["mask"])


def call_diffusers(model, inp):
    return model(inp["x"], inp["t"], encoder_hidden_states=inp["context"], encoder_attention_mask=inp["mask"],
                 return_dict=False)[0]


def train_step(model: nn.Module, call: Callable, inputs: dict, settings: Settings, *, bf16: bool | None = None,
               fused_adamw: bool = False, lr: float = 1e-4) -> Callable[[], None]:
    """One training step as a function: forward (bf16 autocast on CUDA by default), MSE to the
    fixed target, backward, AdamW. `model` may be a compiled wrapper of the module."""
    bf16 = settings.cuda if bf16 is None else bf16
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused_adamw or None)

    def step():
        with torch.autocast(settings.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(call(model, inputs).float(), inputs["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def throughput(steps: dict[str, Callable[[], None]], batch: int, settings: Settings,
               warmup: int = 2, block: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """images/s of each training step: after `warmup` steps each (timed: that is where compiling
    happens), `repeats` rounds in which each takes its turn at a block of `block` steps (default
    `settings.steps`); the median block. Returns (images/s, warm-up seconds) by name."""
    block = block or settings.steps
    warm = {}
    for name, step in steps.items():
        settings.sync()
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        settings.sync()
        warm[name] = time.perf_counter() - start
    blocks = {name: [] for name in steps}
    for _ in range(settings.repeats):
        for name, step in steps.items():
            settings.sync()
            start = time.perf_counter()
            for _ in range(block):
                step()
            settings.sync()
            blocks[name].append(time.perf_counter() - start)
    return {name: batch * block / statistics.median(b) for name, b in blocks.items()}, warm


def timed_sizes(settings: Settings) -> Sizes:
    """The preset's sizes as the suites time them (quick: at most 8 images a batch)."""
    sizes = preset_sizes(settings.preset)
    if settings.quick:  # a few images per step
        sizes = dataclasses.replace(sizes, batch=min(sizes.batch, 8))
    return sizes


def _minisd_unet(config, settings: Settings, seed: int = 0):
    from minisd.unet import UNet

    torch.manual_seed(seed)
    return UNet(config).to(settings.device).train()


def _where(settings: Settings, sizes: Sizes) -> str:
    return f"{sizes.preset} preset, batch {sizes.batch}, {sizes.side}×{sizes.side} latents, {settings.dtype_note}"


# --- the suites ----------------------------------------------------------------------------------

def bench_explorer(sd, repeats: int = 3, steps: int = 50, guidance: float = 4.0) -> list[dict]:
    """Pressing Run (sample, decode every step, draw the last), alone and side by side, and the
    redraw after a slider move, timed at every position: seconds."""
    from minisd.widgets import denoising_explorer

    def explorer(**settings):
        ex = denoising_explorer(sd, **{"steps": steps, "guidance": guidance, **settings}, run=False)
        if not ex.run():
            raise MinisdError(f"the explorer refused the benchmark's settings: {ex.message.value}")
        return ex

    def redraws(ex) -> list[float]:  # Run leaves the slider at the end: visit every other position, then back
        return [_timed(lambda p=p: setattr(ex.step_slider, "value", p)) for p in [*range(steps - 1, -1, -1), steps]]

    def seconds(what, value, target=None):
        return row(what, value, "s", target, higher_is_better=False)

    explorer(steps=5)  # warm-up
    rows = []
    for sampler in ("ddim", "dpmsolver++"):
        ex = explorer(sampler=sampler)
        rows.append(seconds(f"press Run: {steps} {sampler} steps, guidance {guidance:g}",
                            statistics.median(_timed(lambda e=ex: e.run(force=True)) for _ in range(repeats)),
                            EXPLORER_TARGETS["run_seconds"]))
    times = redraws(ex)
    rows.append(seconds(f"move the step slider: redraw (median of {len(times)} positions)",
                        statistics.median(times), EXPLORER_TARGETS["redraw_seconds"]))
    rows.append(seconds("move the step slider: redraw (slowest position)", max(times),
                        EXPLORER_TARGETS["redraw_seconds"]))
    ex = explorer(sampler="ddim", compare=True, sampler_b="dpmsolver++", steps_b=steps, guidance_b=guidance)
    rows.append(seconds(f"press Run, side by side: {steps} ddim and {steps} dpmsolver++ steps",
                        statistics.median(_timed(lambda: ex.run(force=True)) for _ in range(repeats))))
    rows.append(seconds("move the step slider, side by side: redraw (median)", statistics.median(redraws(ex)),
                        EXPLORER_TARGETS["redraw_seconds"]))
    return rows


def bench_unet(settings: Settings) -> list[dict]:
    """minisd's U-Net against diffusers' at the same configuration: training images/s and the ratio."""
    _need_diffusers()
    sizes = timed_sizes(settings)
    ours = _minisd_unet(sizes.unet, settings)
    torch.manual_seed(0)
    theirs = diffusers_unet(sizes.unet, sizes.side).to(settings.device).train()
    n_ours, n_theirs = param_count(ours), param_count(theirs)
    check_param_counts(n_ours, n_theirs)
    inputs = training_inputs(sizes.unet, sizes.batch, sizes.side, sizes.context_length, settings.device)
    target = UNET_RATIO_TARGETS["cuda"] if settings.cuda else (
        UNET_RATIO_TARGETS["cpu"] if sizes.preset == "cpu" else None)
    where = _where(settings, sizes)
    rows = [row("minisd UNet: parameters", n_ours, "params", note=f"diffusers: {n_theirs:,}"),
            row("diffusers UNet2DConditionModel: parameters", n_theirs, "params",
                note=f"{(n_theirs - n_ours) / n_ours:+.2%} vs minisd")]
    variants = [("eager", lambda m: m)] + ([("compiled", torch.compile)] if settings.compile else [])
    for label, wrap in variants:
        steps = {"minisd": train_step(wrap(ours), call_minisd, inputs, settings),
                 "diffusers": train_step(wrap(theirs), call_diffusers, inputs, settings)}
        speed, warm = throughput(steps, sizes.batch, settings, warmup=3 if label == "compiled" else 2)
        for name, what in (("minisd", "minisd UNet"), ("diffusers", "diffusers UNet2DConditionModel")):
            note = where + (f"; compiling + warm-up {warm[name]:.0f} s" if label == "compiled" else "")
            rows.append(row(f"{what} training step, {label}", speed[name], "images/s", note=note))
        rows.append(row(f"ratio minisd / diffusers, {label}", speed["minisd"] / speed["diffusers"], "×",
                        target if label == "eager" else None,
                        note="target: ≥ 1.0 on CPU (cpu preset), ≥ 1.2 in bf16 on a GPU" if label == "eager" else ""))
    return rows


def _random_pipeline(preset: str, device):
    """A StableDiffusion from the preset's configs with random weights: the speed of that preset."""
    from minisd.clip import TextEncoder
    from minisd.pipeline import StableDiffusion
    from minisd.tokenizer import shapes_tokenizer
    from minisd.unet import UNet
    from minisd.vae import VAE

    sizes = preset_sizes(preset)
    tokenizer = shapes_tokenizer(sizes.text.max_length, paraphrases=True)
    torch.manual_seed(0)
    text_encoder = TextEncoder(dataclasses.replace(sizes.text, vocab_size=len(tokenizer)))
    sd = StableDiffusion(VAE(sizes.vae), text_encoder, tokenizer, UNet(sizes.unet), image_size=sizes.image_size)
    return sd.to(device)


def _time_sampling(sd, n: int, settings: Settings, steps: int = 50, guidance: float = 4.0,
                   repeats: int | None = None) -> float:
    def sample():
        sd(PROMPT, num_images=n, num_inference_steps=steps, guidance_scale=guidance, sampler="ddim", seed=0)
        settings.sync()

    sd(PROMPT, num_images=min(n, 2), num_inference_steps=2, guidance_scale=guidance)  # warm-up
    settings.sync()
    return statistics.median(_timed(sample) for _ in range(repeats or settings.repeats))


def bench_sampling(settings: Settings) -> list[dict]:
    """64 images, 50 guided DDIM steps: the shipped model, and the gpu preset with random weights."""
    from minisd.pipeline import StableDiffusion

    rows = []
    n = 4 if settings.quick else 64
    sd = StableDiffusion.from_pretrained(settings.run, device=str(settings.device))
    seconds = _time_sampling(sd, n, settings)
    what = f"{settings.run} ({sd.image_size}×{sd.image_size}): {n} images, 50 DDIM steps, guidance 4"
    rows.append(row(what, seconds, "s", None if settings.quick else SAMPLING_TARGET_SECONDS, False,
                    note="whole call: text, sampling, decoding"))
    rows.append(row(what, n / seconds, "images/s"))
    preset = "tiny" if settings.quick else "gpu"
    sd = _random_pipeline(preset, settings.device)
    n = 2 if settings.quick else (64 if settings.cuda else 8)
    slow = not (settings.cuda or settings.quick)  # about a minute a run on 2 CPU cores: time it once
    seconds = _time_sampling(sd, n, settings, repeats=1 if slow else None)
    what = f"{preset} preset, random weights ({sd.image_size}×{sd.image_size}): {n} images, 50 DDIM steps"
    note = "speed only" + (f"; {n} images and 1 timed run on CPU, 64 images on CUDA" if slow else "")
    rows.append(row(what, seconds, "s", None, False, note=note))
    rows.append(row(what, n / seconds, "images/s", note=note))
    return rows


def _guided_sample(unet, x, context, mask, settings: Settings, vae=None, steps: int = 50, guidance: float = 4.0):
    """The pipeline's loop without the text encoder: 50 DDIM steps on the doubled batch (prompt and
    empty prompt), then the VAE decoder when there is one."""
    from minisd.diffusion import NoiseSchedule
    from minisd.pipeline import SCHEDULE
    from minisd.samplers import make_sampler

    sampler = make_sampler("ddim", NoiseSchedule(**SCHEDULE), num_inference_steps=steps)
    context2, mask2 = torch.cat([context, torch.zeros_like(context)]), torch.cat([mask, mask])
    with torch.no_grad(), torch.autocast(settings.device.type, dtype=torch.bfloat16, enabled=settings.cuda):
        for t in sampler.timesteps.tolist():
            tt = torch.full((2 * len(x),), t, dtype=torch.long, device=x.device)
            cond, uncond = unet(torch.cat([x, x]), tt, context2, mask2).float().chunk(2)
            x = sampler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        if vae is not None:
            x = vae.decode_latents(x)
    settings.sync()
    return x


def bench_latent(settings: Settings) -> list[dict]:
    """The preset's U-Net on latents against the same widths on pixels (3 channels, full size)."""
    from minisd.vae import VAE

    sizes = timed_sizes(settings)
    slow = not (settings.cuda or settings.quick)  # a pixel step of the cpu preset takes ~20 s on 2 CPU cores
    pixel_config = dataclasses.replace(sizes.unet, in_channels=3, out_channels=3)
    models = {"latent": (_minisd_unet(sizes.unet, settings), sizes.side, sizes.unet),
              "pixel": (_minisd_unet(pixel_config, settings), sizes.image_size, pixel_config)}
    inputs = {k: training_inputs(cfg, sizes.batch, side, sizes.context_length, settings.device)
              for k, (_, side, cfg) in models.items()}
    steps = {k: train_step(m, call_minisd, inputs[k], settings) for k, (m, _, _) in models.items()}
    speed, _ = throughput(steps, sizes.batch, settings, warmup=1 if slow else 2, block=1 if slow else None)
    s = sizes.image_size
    rows = [row(f"training step on latents ({sizes.side}×{sizes.side}×{sizes.unet.in_channels})", speed["latent"],
                "images/s", note=f"{sizes.preset} preset U-Net, batch {sizes.batch}, {settings.dtype_note}"
                + ("; blocks of 1 step on CPU" if slow else "")),
            row(f"training step on pixels ({s}×{s}×3), same U-Net widths", speed["pixel"], "images/s"),
            row("latent / pixel training speed", speed["latent"] / speed["pixel"], "×")]
    n = 2 if settings.quick or not settings.cuda else 8
    torch.manual_seed(0)
    vae = VAE(sizes.vae).to(settings.device).eval()
    times = {"latent": [], "pixel": []}
    for k, (m, _, _) in models.items():  # warm-up
        m.eval()
        _guided_sample(m, inputs[k]["x"][:n], inputs[k]["context"][:n], inputs[k]["mask"][:n], settings,
                       vae if k == "latent" else None, steps=2)
    for _ in range(settings.repeats):
        for k, (m, _, _) in models.items():
            times[k].append(_timed(lambda k=k, m=m: _guided_sample(
                m, inputs[k]["x"][:n], inputs[k]["context"][:n], inputs[k]["mask"][:n], settings,
                vae if k == "latent" else None)))
    per_image = {k: statistics.median(v) / n for k, v in times.items()}
    rows += [row("50-step guided sample on latents, + VAE decoder", per_image["latent"], "s/image", None, False,
                 note=f"{n} images at a time"),
             row("50-step guided sample on pixels", per_image["pixel"], "s/image", None, False,
                 note=f"{n} images at a time"),
             row("latent / pixel sampling speed", per_image["pixel"] / per_image["latent"], "×")]
    return rows


def _attention_op(settings: Settings, sizes: Sizes) -> list[dict]:
    """Self-attention alone at the largest sequence a transformer block of the U-Net sees: the
    written-out softmax(QKᵀ/√d)V against F.scaled_dot_product_attention, forward + backward."""
    from minisd.attention import attention

    c = sizes.unet
    level = min(c.attention_levels)
    channels = c.base_channels * c.channel_mults[level]
    length = sizes.largest_attention_side ** 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sizes.batch, c.heads, length, channels // c.heads, generator=g)
               .to(settings.device).requires_grad_() for _ in range(3))
    ops = {"written-out": attention, "fused": F.scaled_dot_product_attention}

    def run(op):
        with torch.autocast(settings.device.type, dtype=torch.bfloat16, enabled=settings.cuda):
            out = op(q, k, v)
        out.float().sum().backward()

    times = {name: [] for name in ops}
    for op in ops.values():
        run(op)
    n = settings.steps
    for _ in range(settings.repeats):
        for name, op in ops.items():
            settings.sync()
            start = time.perf_counter()
            for _ in range(n):
                run(op)
            settings.sync()
            times[name].append((time.perf_counter() - start) / n * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    shape = f"batch {sizes.batch}, {c.heads} heads, {length} tokens × {channels // c.heads} channels"
    return [row("attention op alone, written-out (forward + backward)", ms["written-out"], "ms", None, False,
                note=shape),
            row("attention op alone, fused (forward + backward)", ms["fused"], "ms", None, False, note=shape),
            row("attention op: fused speed-up", ms["written-out"] / ms["fused"], "×")]


def bench_attention(settings: Settings) -> list[dict]:
    """Written-out against fused attention: the U-Net's training step, and the op alone."""
    from minisd.attention import set_attention_options

    sizes = timed_sizes(settings)
    models = {}
    for fused in (False, True):
        models[fused] = _minisd_unet(sizes.unet, settings)
        set_attention_options(models[fused], fused=fused)
    inputs = training_inputs(sizes.unet, sizes.batch, sizes.side, sizes.context_length, settings.device)
    speed, _ = throughput({name: train_step(m, call_minisd, inputs, settings) for name, m in
                           (("written-out", models[False]), ("fused", models[True]))}, sizes.batch, settings)
    where = _where(settings, sizes)
    return [row("U-Net training step, written-out attention", speed["written-out"], "images/s", note=where),
            row("U-Net training step, fused attention", speed["fused"], "images/s", note=where),
            row("U-Net training step: fused speed-up", speed["fused"] / speed["written-out"], "×"),
            *_attention_op(settings, sizes)]


def fused_adamw_works(device) -> bool:
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def bench_switches(settings: Settings) -> list[dict]:
    """The minisd U-Net's training step with each speed switch added to eager float32 + AdamW."""
    sizes = timed_sizes(settings)
    base = _minisd_unet(sizes.unet, settings)
    inputs = training_inputs(sizes.unet, sizes.batch, sizes.side, sizes.context_length, settings.device)
    last = {k: (v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v) for k, v in inputs.items()}
    fused_ok = fused_adamw_works(settings.device)
    steps = {"baseline": train_step(base, call_minisd, inputs, settings, bf16=False),
             "channels-last": train_step(copy.deepcopy(base).to(memory_format=torch.channels_last), call_minisd,
                                         last, settings, bf16=False)}
    unavailable = {}
    if fused_ok:
        steps["fused AdamW"] = train_step(copy.deepcopy(base), call_minisd, inputs, settings, bf16=False,
                                          fused_adamw=True)
    else:
        unavailable["fused AdamW"] = f"unavailable on {settings.device.type} in torch {torch.__version__}"
    if settings.compile:
        steps["torch.compile"] = train_step(torch.compile(copy.deepcopy(base)), call_minisd, inputs, settings, bf16=False)
    else:
        unavailable["torch.compile"] = "skipped (--no-compile)"
    if settings.cuda:
        steps["bf16 autocast"] = train_step(copy.deepcopy(base), call_minisd, inputs, settings, bf16=True)
        all_on = copy.deepcopy(base).to(memory_format=torch.channels_last)
        steps["all of them"] = train_step(torch.compile(all_on) if settings.compile else all_on, call_minisd, last,
                                          settings, bf16=True, fused_adamw=fused_ok)
    else:
        unavailable["bf16 autocast"] = "needs CUDA"
    speed, warm = throughput(steps, sizes.batch, settings, warmup=3 if settings.compile else 2)
    where = f"{sizes.preset} preset, batch {sizes.batch}, {sizes.side}×{sizes.side} latents"
    rows = [row("baseline: eager float32, AdamW", speed["baseline"], "images/s", note=where)]
    order = ["channels-last", "fused AdamW", "torch.compile", "bf16 autocast", "all of them"]
    for name in order:
        if name in speed:
            note = f"compiling + warm-up {warm[name]:.0f} s" if name in ("torch.compile", "all of them") else ""
            rows.append(row(f"+ {name}", speed[name], "images/s", note=note))
        elif name in unavailable:
            rows.append(row(f"+ {name}", None, "images/s", note=unavailable[name]))
    for name in order:
        if name in speed:
            rows.append(row(f"+ {name}: speed-up vs baseline", speed[name] / speed["baseline"], "×"))
    return rows


def train_step_flops(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> int:
    """FLOPs of one forward + backward, `loss_fn(model).backward()`, counted by
    `torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions; a multiply-add is 2).
    Counted with the written-out attention: FlopCounterMode has no formula for the CPU's fused
    attention kernel and would count it as 0; the written-out one does the same products."""
    from torch.utils.flop_counter import FlopCounterMode

    from minisd.attention import MultiHeadAttention

    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    fused = [m.fused for m in layers]
    for m in layers:
        m.fused = False
    try:
        with FlopCounterMode(display=False) as counter:
            loss_fn(model).backward()
    finally:
        for m, f in zip(layers, fused):
            m.fused = f
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_bf16_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def bench_mfu(settings: Settings) -> list[dict]:
    """Achieved FLOP/s of the U-Net's training step, and on CUDA its share of the card's peak."""
    sizes = timed_sizes(settings)
    model = _minisd_unet(sizes.unet, settings)
    inputs = training_inputs(sizes.unet, sizes.batch, sizes.side, sizes.context_length, settings.device)

    def loss_fn(m):
        with torch.autocast(settings.device.type, dtype=torch.bfloat16, enabled=settings.cuda):
            return F.mse_loss(call_minisd(m, inputs).float(), inputs["target"])

    flops = train_step_flops(model, loss_fn)
    # compiled only on CUDA: on CPU compiling costs minutes and gains little (see the switches suite)
    variants = [("eager", model)] + ([("compiled", torch.compile(model))] if settings.compile and settings.cuda else [])
    speed, _ = throughput({label: train_step(m, call_minisd, inputs, settings) for label, m in variants},
                          sizes.batch, settings, warmup=3 if settings.compile else 2)
    rows = [row("U-Net training step: FLOPs (forward + backward)", flops / 1e9, "GFLOP",
                note=f"FlopCounterMode; {_where(settings, sizes)}")]
    name = torch.cuda.get_device_name(settings.device) if settings.cuda else None
    peak = peak_bf16_flops(name) if name else None
    for label, _ in variants:
        achieved = flops * speed[label] / sizes.batch  # FLOP per step × steps per second
        if settings.cuda:
            rows.append(row(f"achieved, {label}", achieved / 1e12, "TFLOP/s", note="step incl. AdamW"))
            rows.append(row(f"MFU, {label}", None if peak is None else 100 * achieved / peak, "%",
                            note=f"unknown peak for {name!r}" if peak is None
                            else f"of {peak / 1e12:g} TFLOP/s dense bf16 ({name})"))
        else:
            rows.append(row(f"achieved, {label}", achieved / 1e9, "GFLOP/s", note="step incl. AdamW"))
            rows.append(row(f"MFU, {label}", None, "%", note="needs CUDA"))
    return rows


def _bench_host(settings: Settings) -> list[dict]:
    from minisd.bench_host import bench_host

    return bench_host(dataclasses.replace(settings, preset=settings.host_preset))


SUITE_FUNCTIONS = {"unet": bench_unet, "sampling": bench_sampling, "latent": bench_latent,
                   "attention": bench_attention, "switches": bench_switches, "mfu": bench_mfu,
                   "host": _bench_host}


def run_bench(suites, run: str = "shapes-cpu", out=None, repeats: int = 3, device: str = "cpu",
              preset: str | None = None, compile: bool = True, quick: bool = False, log=print) -> dict:
    """Measure `suites` (all when empty) and return {machine, run, preset, …, suites: {name: rows},
    skipped: {name: reason}}; write it to `out` as JSON when given."""
    from minisd.runs import write_json
    from minisd.train import PRESETS, pick_device

    named = bool(suites)
    suites = list(dict.fromkeys(suites)) or list(SUITES)
    for s in suites:
        check_choice("bench suite", s, SUITES)
    check_count("repeats", repeats, 1, 100)
    host_preset = preset or ("tiny" if quick else "gpu")
    preset = preset or ("tiny" if quick else "cpu")
    check_choice("preset", preset, PRESETS)
    if out is not None and not Path(out).parent.exists():
        raise MinisdError(f"folder {str(Path(out).parent)!r} for --out does not exist; create it first")
    dev = pick_device(device)
    skipped = {}
    if not named and compile and dev.type == "cpu":
        compile = False
        skipped["torch.compile rows"] = ("compiling takes 2–3 minutes per model on a small CPU; name the suites, "
                                         "e.g. `minisd bench unet switches`, to include them")
    if not named and "unet" in suites:
        try:
            _need_diffusers()
        except MinisdError as e:
            suites.remove("unet")
            skipped["unet"] = str(e)
    settings = Settings(preset, dev, compile, quick, repeats, str(run), host_preset)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
              "run": str(run), "preset": preset, "repeats": repeats, "compile": compile, "quick": quick,
              "suites": {}, "skipped": skipped}
    for what, reason in skipped.items():
        if log is not None:
            log(f"[skipping {what}: {reason}]")
    if "unet" in suites:
        _need_diffusers()  # before anything is measured
    for suite in suites:
        start = time.perf_counter()
        if suite == "explorer":
            from minisd.pipeline import StableDiffusion

            result["suites"]["explorer"] = bench_explorer(StableDiffusion.from_pretrained(run, device=device),
                                                          repeats, steps=10 if quick else 50)
        else:
            result["suites"][suite] = SUITE_FUNCTIONS[suite](settings)
        if log is not None:
            log(f"[{suite}: {time.perf_counter() - start:.0f} s]")
    if out is not None:
        write_json(Path(out), result)
    return result


def _format_value(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def _ok(r: dict) -> str:
    if r["target"] is None or r["value"] is None:
        return ""
    good = r["value"] >= r["target"] if r["higher_is_better"] else r["value"] < r["target"]
    return "yes" if good else "NO"


def format_table(result: dict) -> str:
    lines = []
    m = result["machine"]
    lines.append(f"# minisd bench · {m['gpu'] or m['device']} · {m['cpus']} CPUs, {m['torch_threads']} torch "
                 f"threads · torch {m['torch']} · model {result['run']}"
                 + (f" · preset {result['preset']}" if "preset" in result else ""))
    for suite, rows in result["suites"].items():
        width = max(len(r["what"]) for r in rows)
        units = max(len(r["unit"]) for r in rows)
        lines.append(f"\n{suite}:")
        lines.append(f"  {'measure':<{width}}  {'value':>9} {'':<{units}}  {'target':>8}  {'ok':<3}  note")
        for r in rows:
            target = "" if r["target"] is None else ("≥ " if r["higher_is_better"] else "< ") + f"{r['target']:g}"
            lines.append(f"  {r['what']:<{width}}  {_format_value(r['value']):>9} {r['unit']:<{units}}  "
                         f"{target:>8}  {_ok(r):<3}  {r['note']}".rstrip())
    for suite, reason in result.get("skipped", {}).items():
        lines.append(f"\n{suite}: skipped ({reason})")
    return "\n".join(lines)
