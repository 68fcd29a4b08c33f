"""`minisd bench host`: the host time of a training step, everything *but* the networks' own work.

A small model on a fast GPU is often limited by the host: Python drawing the batch, writing and
tokenising captions, launching a few thousand tiny kernels, reading the loss back every step
(which makes the CPU wait for the GPU). None of that needs a GPU to be measured. This suite runs
the real training loop (`minisd.train.train`) of each stage with the real loss function, the
real optimiser and EMA, at the preset's batch size, but with every network swapped for a
stand-in of the same interface:

- the same number of parameter tensors as the real network (so AdamW, gradient clipping and the
  EMA launch as many per-tensor operations as they would), each a single number;
- a forward pass of a handful of operations that returns outputs of the real kind.

Each row of data is kept small (images 2·f × 2·f for a VAE that down-samples by f, latents 2×2,
text states 8 wide), so the arithmetic a GPU does in microseconds does not pose as host time on
a CPU; the number of rows per batch is the preset's. What is left per step is host work: the
Python of the loop and the loss, random draws, caption handling, operation launches, syncs. On a
GPU, a step can never be faster than the host's work.

Time per step = (time of W + N steps − time of W steps) / N, so set-up (the model's copy for
the EMA, the optimiser) is not counted; the median over `repeats`.

Two parts of that time are not the loop's, and the host time per step (`loop_ms_per_step`, the
figure held against the target) leaves them out, each measured, not assumed:

- The CPU's arithmetic on the batch. Some of it cannot be made small with the rows: CLIP's loss
  compares every image of the batch with every caption, a 512 × 512 matrix, and its forward and
  backward take the CPU milliseconds that are microseconds of kernels on a GPU. So each stage is
  also timed with `FEW_ROWS` rows per batch, and the operations of a step are listed
  (`OperationCount`) at both batch sizes: when the host issues the same operations either way (the
  same kinds, as many of each), the host's share is the time with few rows.
- The stand-in network's own forward and backward. To reach each of its hundreds of weights it
  stacks them (one operation per weight) and its backward hands each weight its gradient (autograd
  runs one node per weight): work of the network, which a real network does in its own forward and
  backward, and which no training loop can change short of capturing the whole step (CUDA graphs,
  compiled autograd). It is timed alone (`network_ms`) and subtracted; its operations are checked
  to be among the step's.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minisd.clip import TextOutput
from minisd.errors import MinisdError, as_if_on_a_gpu, check_choice
from minisd.vae import DiagonalGaussian, VAEOutput

HOST_STAGES = ("vae", "clip", "unet")
HOST_TARGET_MS = 2.0  # issue 15: at most this much host time per training step, each stage
STANDIN_WIDTH = 8  # the stand-in text encoder's state width
FEW_ROWS = 8  # rows per batch for the time without the batch's arithmetic


class StandIn(nn.Module):
    """`n` one-number parameters; `scale()` ties them all into one scalar (gradients reach each)."""

    def __init__(self, n: int):
        super().__init__()
        for i in range(n):
            self.register_parameter(f"w{i}", nn.Parameter(torch.ones(())))

    def scale(self) -> torch.Tensor:
        # the module's own table of weights: the stand-in's forward costs the host as little as it can
        # (an `nn.ParameterList` looks each one up by name, ~3 µs a weight, which no real network pays)
        return torch.stack(tuple(self._parameters.values())).mean()


class StandInVAE(StandIn):
    """VAE interface: forward(x, generator) → VAEOutput(reconstruction, posterior, latents)."""

    def __init__(self, n: int, latent_channels: int, factor: int):
        super().__init__(n)
        self.latent_channels, self.factor = latent_channels, factor

    def forward(self, x, generator=None):
        s = self.scale()
        pooled = nn.functional.avg_pool2d(x.mean(1, keepdim=True), self.factor)  # (B, 1, h, w)
        mean = pooled.expand(-1, self.latent_channels, -1, -1) * s
        posterior = DiagonalGaussian(mean, mean - 1)
        z = posterior.sample(generator)
        return VAEOutput(x * s, posterior, z)


class StandInCLIP(StandIn):
    """CLIP interface: forward(images, ids, mask) → logits (B_images, B_texts); clamp_logit_scale()."""

    def forward(self, images, ids, mask):
        s = self.scale()
        return (images.flatten(1).mean(1)[:, None] + ids.float().mean(1)[None, :]) * s

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.w0.clamp_(0, 100)


class StandInText(nn.Module):
    """The frozen text tower's interface: forward(ids, mask) → TextOutput, from one embedding lookup."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, STANDIN_WIDTH)

    def forward(self, ids, mask):
        x = self.embedding(ids)  # (B, L, 8)
        return TextOutput(x, x[:, 0], mask)


class StandInUNet(StandIn):
    """U-Net interface: forward(x, t, context, context_mask) → a tensor shaped like x."""

    def forward(self, x, t, context=None, context_mask=None):
        return x * self.scale() + context.mean() + t.float().mean() * 1e-3


class HostReads:
    """Count reads of tensor values into Python (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, `float(t)`)
    inside `with HostReads() as reads:`. With the data on a GPU, each is a sync: the host stops
    until every kernel queued before it has run. On the CPU nothing waits, so the count is how the
    syncs a GPU would see are measured here."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.count, self.saved = 0, {m: getattr(torch.Tensor, m) for m in self.METHODS}

        def counting(method):
            def read(tensor, *args, **kwargs):
                self.count += 1
                return method(tensor, *args, **kwargs)
            return read

        for name, method in self.saved.items():
            setattr(torch.Tensor, name, counting(method))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


class OperationCount(TorchDispatchMode):
    """Count the tensor operations run inside `with OperationCount() as ops:` (`ops.count`; of each
    kind, `ops.kinds`), the backward pass's too: on a GPU each is a kernel launch (or a view) the host issues."""

    def __init__(self):
        super().__init__()
        self.kinds = collections.Counter()

    @property
    def count(self) -> int:
        return self.kinds.total()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":  # not the profiler's record_function markers
            self.kinds[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _count(build) -> int:
    """Parameter tensors of a network, built on the meta device (no memory, no arithmetic)."""
    with torch.device("meta"):
        return len(list(build().parameters()))


def stage_setup(stage: str, preset: str, rows: int = 4096, seed: int = 0, tensors: int | None = None):
    """(stand-in model, loss_fn, data, TrainConfig, hook) for one stage of `preset`, shaped as
    the real stage (batch size, EMA, loss function) with small rows; see the module docstring.
    tensors: the stand-in's number of parameter tensors (default: the real network's)."""
    from minisd.clip import CLIP, clip_loss_fn, clip_presets
    from minisd.data import sample_labels
    from minisd.diffusion import NoiseSchedule
    from minisd.pipeline import SCHEDULE, unet_loss_fn, unet_presets
    from minisd.tokenizer import shapes_tokenizer
    from minisd.unet import UNet
    from minisd.vae import VAE, VAE_PRESETS, vae_train_loss

    check_choice("stage", stage, HOST_STAGES)
    labels = sample_labels(rows, "train", np.random.default_rng(seed))
    g = torch.Generator().manual_seed(seed)
    vae_config, vae_train, beta = VAE_PRESETS[preset]
    clip_config, clip_train = clip_presets()[preset]
    f = vae_config.downsampling_factor
    if stage == "vae":
        model = StandInVAE(tensors or _count(lambda: VAE(vae_config)), vae_config.latent_channels, f)
        images = torch.randint(0, 256, (rows, 3, 2 * f, 2 * f), dtype=torch.uint8, generator=g)
        return model, vae_train_loss(beta), images, vae_train, None
    tokenizer = shapes_tokenizer(clip_config.text.max_length, paraphrases=True)
    if stage == "clip":
        config = dataclasses.replace(clip_config, text=dataclasses.replace(clip_config.text,
                                                                          vocab_size=len(tokenizer)))
        model = StandInCLIP(tensors or _count(lambda: CLIP(config)))
        images = torch.randint(0, 256, (rows, 3, 8, 8), dtype=torch.uint8, generator=g)
        return model, clip_loss_fn(tokenizer), (images, labels), clip_train, \
            lambda step, loss: model.clamp_logit_scale()
    unet_config, unet_train, _ = unet_presets()[preset]
    unet_config = dataclasses.replace(unet_config, in_channels=vae_config.latent_channels,
                                      out_channels=vae_config.latent_channels, context_dim=clip_config.text.width)
    model = StandInUNet(tensors or _count(lambda: UNet(unet_config)))
    text = StandInText(len(tokenizer)).eval().requires_grad_(False)
    latents = torch.randn(rows, vae_config.latent_channels, 2, 2, generator=g)
    return model, unet_loss_fn(text, tokenizer, NoiseSchedule(**SCHEDULE)), (latents, labels), unet_train, None


def host_ms_per_step(stage: str, preset: str = "gpu", steps: int = 60, warmup: int = 20, repeats: int = 3,
                     device: str = "cpu", tensors: int | None = None, batch: int | None = None,
                     flat: bool = True, count_operations: bool = True, network: bool = True) -> tuple[float, dict]:
    """Milliseconds per training step of `stage` with stand-in networks (median over `repeats`), and
    what was run: the reads of values and operations per step, and the stand-in network's own
    share of the step (`network_ms`, see the module docstring). tensors: give the stand-in this many
    parameter tensors instead of the real network's; batch: rows per batch instead of the preset's;
    flat: the weights in one flat tensor, as on a GPU (False: per tensor, the CPU's default);
    count_operations: False skips the extra runs that count them (`operations_per_step` is then None);
    network: False skips timing the stand-in alone (the `network_*` entries are then None)."""
    from minisd.train import FlatParameters, train

    model, loss_fn, data, config, hook = stage_setup(stage, preset, tensors=tensors)
    # As on a GPU: AdamW's fused kernel (one call for all tensors; the CPU default runs tensor by tensor)
    # and the weights in one flat tensor (`minisd.train.FlatParameters`; the CPU's default is per tensor)
    config = dataclasses.replace(config, progress=False, device=device, warmup_steps=min(config.warmup_steps, 10),
                                 fused_optimizer=True, flat_parameters=flat, batch_size=batch or config.batch_size)

    def run(n: int, counter=None) -> tuple[float, int, collections.Counter]:
        m = copy.deepcopy(model)  # a fresh copy each run: the same start every time
        with HostReads() as reads, as_if_on_a_gpu(), counter or contextlib.nullcontext():
            start = time.perf_counter()
            # the CLIP stage's hook clamps the temperature of the copy being trained
            train(m, loss_fn, data, dataclasses.replace(config, steps=n),
                  hook=hook and (lambda step, loss: m.clamp_logit_scale()))
            seconds = time.perf_counter() - start
        return seconds, reads.count, counter.kinds if counter else collections.Counter()

    def alone(n: int, counter=None, backward: bool = True) -> tuple[float, int, collections.Counter]:
        """n forward and backward passes of the stand-in alone (backward=False: only clearing the
        gradients, which the loop does itself), its weights laid out as in the loop."""
        m = copy.deepcopy(model).to(device)
        params = list(m.parameters())
        if flat:
            FlatParameters(params)
        with counter or contextlib.nullcontext():
            start = time.perf_counter()
            for _ in range(n):
                if backward:
                    m.scale().backward()
                for p in params:
                    p.grad = None
            seconds = time.perf_counter() - start
        return seconds, 0, counter.kinds if counter else collections.Counter()

    def per_step(measure, **kw) -> tuple[float, float]:
        (long, reads_long, _), (short, reads_short, _) = measure(warmup + steps, **kw), measure(warmup, **kw)
        return (long - short) / steps * 1e3, (reads_long - reads_short) / steps

    times, network_times, reads = [], [], 0
    for _ in range(repeats):
        ms, reads = per_step(run)
        times.append(ms)
        if network:
            network_times.append(per_step(alone)[0] - per_step(alone, backward=False)[0])
    info = {"batch": config.batch_size, "parameter_tensors": len(list(model.parameters())),
            "ema": config.ema_decay > 0, "reads_per_step": reads, "operations_per_step": None,
            "operations": None, "network_operations": None,
            "network_ms": statistics.median(network_times) if network else None,
            "ms_runs": times, "network_ms_runs": network_times}  # every repeat's figures, for the spread
    if count_operations:  # counted in runs of their own (counting slows every operation down)
        for key, measure in [("operations", run)] + [("network_operations", alone)] * network:
            counted = measure(warmup + steps, OperationCount())[2]
            counted.subtract(measure(warmup, OperationCount())[2])
            info[key] = +counted  # of each kind, in `steps` steps
        info["operations_per_step"] = info["operations"].total() / steps
    return statistics.median(times), info


def loop_ms_per_step(stage: str, preset: str = "gpu", **kw) -> tuple[float, dict]:
    """The training loop's host time per step (what `HOST_TARGET_MS` is held against): the time with
    stand-in networks with `FEW_ROWS` rows per batch — when the host issues the same operations as at
    the preset's batch, else at the preset's batch — less the stand-in network's own forward and
    backward. Returns (ms, info) with both runs' figures (`at_batch`, `few`: each (ms, info)),
    `same_operations`, the share of each repeat (`ms_runs`); kw: see `host_ms_per_step`."""
    kw = {**kw, "count_operations": True}  # the comparisons below need the operations
    few = host_ms_per_step(stage, preset, batch=FEW_ROWS, **kw)
    # the stand-in's own work does not depend on the batch: timed once, with the few rows
    at_batch = host_ms_per_step(stage, preset, network=False, **kw)
    same = few[1]["operations"] == at_batch[1]["operations"]
    ms, info = few if same else at_batch
    own = few[1]
    outside = own["network_operations"] - info["operations"]  # what is subtracted must run in the step
    if outside:
        raise MinisdError(f"the stand-in network's own operations are not all in the step: {dict(outside)}")
    return ms - own["network_ms"], {"at_batch": at_batch, "few": few, "same_operations": same,
                                    "stand_in_ms": ms, "network_ms": own["network_ms"],
                                    # each repeat's share, for the spread
                                    "ms_runs": [a - b for a, b in zip(info["ms_runs"], own["network_ms_runs"])]}


def bench_host(settings) -> list[dict]:
    """The training loop's host time per step of each stage, and the measurements it is made of (see
    the module docstring)."""
    from minisd.bench import row

    out = []
    kw = dict(steps=10 if settings.quick else 60, warmup=5 if settings.quick else 20, repeats=settings.repeats,
              device=str(settings.device))
    for stage in HOST_STAGES:
        ms, parts = loop_ms_per_step(stage, settings.preset, **kw)
        at_batch_ms, info = parts["at_batch"]
        few_ms, few = parts["few"]
        batch, tensors = info["batch"], info["parameter_tensors"]
        out.append(row(f"{stage}: host time per step", ms, "ms", HOST_TARGET_MS, higher_is_better=False,
                       note=f"the loop's share: {parts['stand_in_ms']:.2f} ms a step with stand-in networks"
                            + (f" and {FEW_ROWS} rows per batch" if parts["same_operations"] else "")
                            + f", less {parts['network_ms']:.2f} ms of the stand-in's own forward and backward; "
                            f"{settings.preset} preset, batch {batch}, {tensors} parameter tensors"
                            + (", EMA" if info["ema"] else "")))
        out.append(row(f"{stage}: … a step at batch {batch}, as measured", at_batch_ms, "ms",
                       note="stand-in networks, the CPU's own arithmetic on the batch included"))
        out.append(row(f"{stage}: … a step with {FEW_ROWS} rows per batch", few_ms, "ms",
                       note=(f"the same operations as at batch {batch}, as many of each kind: "
                             if parts["same_operations"] else f"other operations than at batch {batch}: ")
                       + f"{few['operations_per_step']:.0f} a step"))
        out.append(row(f"{stage}: … the stand-in's own forward and backward", parts["network_ms"], "ms",
                       note=f"stacking its {tensors} weights, and autograd handing each its gradient: "
                            "the network's work, not the loop's"))
        per_ms, _ = loop_ms_per_step(stage, settings.preset, flat=False, **kw)
        out.append(row(f"{stage}: … with the weights per tensor", per_ms, "ms",
                       note=f"the loop's share as above, per tensor (the CPU's default; flat is CUDA's): "
                            f"{per_ms / ms:.2f} × the flat time"))
        # With one parameter tensor what is left is the loop, the data, the draws and the loss; the
        # difference is the loop's work per weight tensor (the gradients' gather, AdamW's, clipping's
        # and the EMA's share: on a CPU the multi-tensor operations run tensor by tensor)
        ms_one, _ = loop_ms_per_step(stage, settings.preset, tensors=1, **kw)
        out.append(row(f"{stage}: … with 1 parameter tensor", ms_one, "ms",
                       note="the loop's share as above: the loop, data, draws, loss"))
        out.append(row(f"{stage}: operations per step", info["operations_per_step"], "",
                       note="tensor operations, backward included: on a GPU each is a kernel launch or a view"))
        out.append(row(f"{stage}: reads of values per step", info["reads_per_step"], "",
                       note="each is a sync on a GPU (.item(), .tolist(), bool(t) …)"))
    return out
