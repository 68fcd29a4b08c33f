"""One plain training loop, and how much compute each preset may use.

The loop is deliberately short: draw a random batch, compute a loss, step the optimiser,
report. Everything a chapter trains goes through `train`; a chapter supplies its own
`loss_fn(model, batch, generator)`, e.g. `diffusion_loss` for a denoiser.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minisd.distributed import mean_over_processes, setup, shard
from minisd.errors import MinisdError, check_choice

PRESETS = ("tiny", "cpu", "gpu")
IMAGE_SIZES = {"tiny": 32, "cpu": 32, "gpu": 64}  # the side of the images each preset trains on
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ON_DEVICE_BYTES = 4 << 30  # training data up to this size is copied to the GPU once (Shapes, cached latents)


def pick_preset() -> str:
    """The preset a notebook should use: 'tiny' under MINISD_QUICK=1 (the tests), else 'gpu'
    when CUDA is present, else 'cpu'. Notebooks call this; library code takes presets as arguments."""
    if os.environ.get("MINISD_QUICK", "") not in ("", "0"):
        return "tiny"
    return "gpu" if torch.cuda.is_available() else "cpu"


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → CUDA if present, else CPU; otherwise the named device, if it is available."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MinisdError("device 'cuda' was asked for but CUDA is not available; use 'cpu' or 'auto'")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MinisdError("device 'mps' was asked for but MPS is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def choose_precision(requested: str, device: torch.device, capability: tuple[int, int] | None = None) -> str:
    """The number format of the forward pass: 'bf16', 'fp16' or 'fp32'.

    'auto' → on CUDA, bf16 autocast where the card has bf16 tensor cores (compute capability ≥ 8.0:
    A100, RTX 30xx, H100 …), float16 autocast with a gradient scaler on older cards (a T4 is 7.5),
    and float32 on the CPU or MPS. Weights and optimiser state stay float32 in every case.
    capability: the card's (major, minor); read from the device when None.
    """
    check_choice("precision", requested, PRECISIONS)
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    major, minor = capability if capability is not None else torch.cuda.get_device_capability(device)
    return "bf16" if (major, minor) >= (8, 0) else "fp16"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NOTES = {"bf16": "bf16 autocast (weights and optimiser in float32)",
                   "fp16": "fp16 autocast with gradient scaling (weights and optimiser in float32)",
                   "fp32": "float32"}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then cosine decay to `min_lr_ratio` · lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    desc: str = "training"
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights (see `EMA`)
    save_every: int = 0  # with a state file: save the training state every this many steps (0: 20 times a run)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32: the forward pass's number format (see `choose_precision`)
    log_every: int = 25  # read the losses back from the device every this many steps (one sync per window)
    # AdamW's fused kernel (one launch for all parameters): None → on CUDA only (the CPU keeps the
    # multi-tensor version, whose weights equal the per-parameter loop's bit for bit); True/False → always/never
    fused_optimizer: bool | None = None
    # Keep all the weights in one flat tensor (see `FlatParameters`): AdamW, clipping and the EMA
    # each become one operation instead of one per weight tensor. None → on CUDA only (the CPU keeps
    # the per-tensor updates, bit for bit as before); True/False → always/never
    flat_parameters: bool | None = None
    channels_last: bool = False  # store the model and 4-D batches as NHWC (faster convolutions on some hardware)
    compile: bool = False  # torch.compile the model for the training steps (a minute of compiling first)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise MinisdError(f"steps and batch_size must be ≥ 1, got {self.steps} and {self.batch_size}")
        if not self.lr > 0:
            raise MinisdError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise MinisdError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check_choice("precision", self.precision, PRECISIONS)
        if self.log_every < 1:
            raise MinisdError(f"log_every must be ≥ 1, got {self.log_every}")


class EMA:
    """An exponential moving average of a model's weights, the copy diffusion models sample from:

        θ_ema ← d · θ_ema + (1 − d) · θ,   d = min(decay, (1 + step) / (10 + step))

    The warm-up of d (as in diffusers' EMAModel) lets a short run's average forget the random
    initial weights quickly; late in a long run d = decay smooths over about 1 / (1 − decay) steps.
    Buffers are copied as they are."""

    def __init__(self, model: nn.Module, decay: float, flat: FlatParameters | None = None):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.params = list(self.model.parameters())
        self.buffers = list(self.model.buffers())
        self.source: tuple[nn.Module, list, list] | None = None  # the trained model, its weights and buffers
        # flat: `model`'s weights are views of one flat tensor; the average's are too, laid out alike,
        # so that one step of the average is one operation
        self.flat = flat
        self.flat_average = flat and FlatParameters(self.params, grad=False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        if self.source is None or self.source[0] is not model:
            self.source = (model, list(model.parameters()), list(model.buffers()))
        _, params, buffers = self.source
        if self.flat is not None:
            self.flat_average.data.lerp_(self.flat.data, 1 - d)
        else:  # one multi-tensor operation for all the weights (a GPU launches a few kernels, not one per tensor)
            torch._foreach_lerp_(self.params, params, 1 - d)
        if self.buffers:
            torch._foreach_copy_(self.buffers, buffers)

    def unflatten(self) -> None:
        """Give each averaged weight its own memory again (see `FlatParameters.unflatten`)."""
        if self.flat_average is not None:
            self.flat_average.unflatten()
            self.flat = self.flat_average = None


class FlatParameters:
    """A model's weights as views of one flat tensor, and their gradients gathered into another.

    A U-Net has hundreds of weight tensors. AdamW, gradient clipping and the EMA update each of
    them, and even their multi-tensor forms cost the host some Python and a launch per tensor
    or chunk. With every weight a view into one flat tensor (as apex's flat master weights and
    PyTorch's FSDP do), each of those updates is one operation on one tensor:

        flat = FlatParameters(list(model.parameters()))   # the weights now live in flat.data
        optimizer = AdamW([flat.parameter])
        loss.backward(); flat.gather_grads()              # the weights' .grad → flat.parameter.grad
        optimizer.step()                                  # updates every weight of the model

    Each weight keeps its shape and memory layout (channels-last stays channels-last); only its
    memory moves. The arithmetic is the same, but a norm over one tensor rounds differently from
    one over many, so the weights differ from per-tensor training by rounding (and a weight that
    got no gradient in a step is updated as if its gradient were 0). `unflatten()` gives each
    weight its own memory back.
    """

    def __init__(self, params: list[nn.Parameter], grad: bool = True):
        first = params[0]
        for p in params:
            dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
            if not dense or p.dtype != first.dtype or p.device != first.device:
                raise MinisdError(f"can only flatten dense weights of one dtype and device, got {tuple(p.shape)} "
                                  f"{p.dtype} on {p.device} with strides {p.stride()}")
        self.params = params
        self.layout, offset = [], 0  # each weight's (shape, strides, offset) in the flat tensor
        for p in params:
            self.layout.append((p.shape, p.stride(), offset))
            offset += p.numel()
        self.data = torch.empty(offset, dtype=first.dtype, device=first.device)
        self.parameter = nn.Parameter(self.data, requires_grad=grad)
        grads = torch.zeros_like(self.data) if grad else None
        self.grad_views = self.views(grads) if grad else []
        with torch.no_grad():
            for p, view in zip(params, self.views(self.data)):
                view.copy_(p)
                p.data = view
                p.grad = None
        self.parameter.grad = grads

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One view of `flat` (a tensor like `data`) per weight, shaped and laid out as the weight."""
        return [flat.as_strided(shape, stride, offset) for shape, stride, offset in self.layout]

    @torch.no_grad()
    def gather_grads(self) -> None:
        """Copy each weight's gradient into its place in `parameter.grad` and clear it (the next
        backward then hands over fresh gradients instead of adding to these)."""
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):  # a weight this step did not use: gradient 0
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        torch._foreach_copy_(self.grad_views, grads)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def unflatten(self) -> None:
        """Each weight back in memory of its own, with its layout (the flat tensor is then unused)."""
        for p in self.params:
            p.data = p.data.clone()
            p.grad = None


class _PerWeightState:
    """An optimiser of a `FlatParameters`' one tensor, seen by state files as one of each weight:
    the same file whether or not the weights were flat, so a run resumes either way."""

    def __init__(self, optimizer, flat: FlatParameters):
        self.optimizer, self.flat = optimizer, flat

    def state_dict(self) -> dict:
        state, n = self.optimizer.state_dict(), len(self.flat.params)
        flat_state = state["state"].get(0, {})
        split = {k: [v] * n if v.dim() == 0 else self.flat.views(v) for k, v in flat_state.items()}
        return {"state": {i: {k: split[k][i] for k in split} for i in range(n)},
                "param_groups": [{**g, "params": list(range(n))} for g in state["param_groups"]]}

    def load_state_dict(self, state: dict) -> None:
        per_weight, groups, n = state["state"], state["param_groups"], len(self.flat.params)
        if len(groups) != 1 or len(groups[0]["params"]) != n:
            raise ValueError(f"the saved optimiser state has {sum(len(g['params']) for g in groups)} weights, "
                             f"this model {n}")
        flat_state = {}
        for key, v in next(iter(per_weight.values()), {}).items():
            if v.dim() == 0:
                flat_state[key] = v
            else:
                whole = torch.zeros_like(self.flat.data)  # a weight without saved state: zero moments
                have = [i for i in range(n) if key in per_weight.get(i, {})]
                views = self.flat.views(whole)
                torch._foreach_copy_([views[i] for i in have], [per_weight[i][key] for i in have])
                flat_state[key] = whole
        self.optimizer.load_state_dict({"state": {0: flat_state} if flat_state else {},
                                        "param_groups": [{**groups[0], "params": [0]}]})


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step
    precision: str = "fp32"  # the forward pass's number format (see `choose_precision`)
    seconds: float = 0.0  # wall time of the training steps, summed over resumed sessions
    ema: nn.Module | None = None  # the averaged weights, when config.ema_decay > 0
    resumed_from: int = 0  # the step a saved state was resumed at (0: started afresh)
    resumed_seconds: float = 0.0  # the training time spent before that

    def smoothed(self, window: int = 50) -> list[float]:
        """Running mean of the loss over `window` steps, for plots."""
        out, acc = [], 0.0
        for i, v in enumerate(self.losses):
            acc += v - (self.losses[i - window] if i >= window else 0.0)
            out.append(acc / min(i + 1, window))
        return out


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine from 1 down to `min_lr_ratio`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so that their joint L2 norm is at most `max_norm`; returns that
    norm. `nn.utils.clip_grad_norm_` does the same, but tensor by tensor on the CPU: this uses the
    multi-tensor operations everywhere, and never reads the norm back to the host."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # ‖(‖g₁‖, ‖g₂‖, …)‖ = ‖g‖
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def _to(x: torch.Tensor, device: torch.device, memory_format) -> torch.Tensor:
    if x.dim() == 4 and x.is_floating_point():
        return x.to(device, non_blocking=True, memory_format=memory_format)
    return x.to(device, non_blocking=True)


def train(model: nn.Module, loss_fn: Callable, data: torch.Tensor | tuple[torch.Tensor, ...],
          config: TrainConfig, hook: Callable[[int, torch.Tensor], None] | None = None,
          state_file=None, shard_batch: bool = True) -> TrainResult:
    """Train `model` in place for `config.steps` steps of AdamW on random batches of `data`.

    data: a tensor (N, …) or a tuple of tensors sharing N, held in memory; each step draws
          `batch_size` random rows (seeded), moves them to the device and calls
    loss_fn(model, batch, generator) → scalar loss, with `batch` a tensor or tuple like `data`.
          `generator` lives on the training device: draw with `device=generator.device`.
    hook(step, loss) is called after every step (e.g. to record samples for a figure); `loss` is
          the step's loss as a tensor on the device — `float(loss)` reads it, at the cost of
          waiting for the device.
    state_file: where to save everything a resume needs (weights, optimiser, EMA, step, losses,
          random state) every `config.save_every` steps; if the file exists, training continues
          from it, and ends exactly where an uninterrupted run would (on the CPU). The caller
          deletes it once the finished weights are saved.
    config.precision: the forward pass's number format, chosen by `choose_precision` ('auto': bf16
          autocast on recent GPUs, fp16 with a gradient scaler on older ones, float32 on the CPU);
          the choice is in `TrainResult.precision`.

    The loop never waits for the device inside a window of `config.log_every` steps: the losses
    stay on the device and are read back together at the end of each window (one sync), so a
    GPU always has the next steps queued. `TrainResult.losses` still has one value per step.

    Started by torchrun on several processes (see `minisd.distributed`), each process computes
    its slice of every global batch and the gradients are averaged, so the weights end as one
    process would leave them. shard_batch=False: every process computes the whole batch instead
    (for a loss that compares all rows with each other, like CLIP's), which also keeps them equal.
    Only rank 0 saves the state file.
    """
    from minisd.checkpoint import load_train_state, save_train_state

    device = pick_device(config.device)
    tensors = data if isinstance(data, tuple) else (data,)
    n = len(tensors[0])
    if any(len(x) != n for x in tensors):
        raise MinisdError(f"data tensors have different lengths {[len(x) for x in tensors]}")
    rank, size = setup(device)
    if size > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if shard_batch and config.batch_size % size:
        raise MinisdError(f"batch_size {config.batch_size} does not split evenly over {size} processes; "
                          f"use a multiple of {size}")
    local = config.batch_size // size if shard_batch else config.batch_size
    if device.type == "cuda" and sum(x.numel() * x.element_size() for x in tensors) < ON_DEVICE_BYTES:
        tensors = tuple(x.to(device) for x in tensors)  # the data on the GPU once: no batch waits for the host
    # Every random number of the loop (batch rows, timesteps, noise, captions) is drawn where it is
    # used: on a GPU no draw runs on the CPU and is copied over. On the CPU this is the same stream as ever.
    generator = torch.Generator(device=device).manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format).train()
    fused = device.type == "cuda" if config.fused_optimizer is None else config.fused_optimizer
    params = list(model.parameters())
    # One flat tensor for all the weights, when asked (CUDA's default); not for a model with frozen
    # weights (AdamW must skip them) or several processes (DDP keeps its own buckets of gradients)
    flat = FlatParameters(params) if (device.type == "cuda" if config.flat_parameters is None
                                      else config.flat_parameters) and size == 1 and params \
        and all(p.requires_grad for p in params) else None
    optimized = [flat.parameter] if flat else params
    optimizer = torch.optim.AdamW(optimized, lr=config.lr, weight_decay=config.weight_decay,
                                  **({"fused": True} if fused else {"foreach": True}))
    saved_optimizer = optimizer if flat is None else _PerWeightState(optimizer, flat)  # what state files hold
    ema = EMA(model, config.ema_decay, flat) if config.ema_decay else None
    precision = choose_precision(config.precision, device)
    autocast = AUTOCAST_DTYPES.get(precision)  # None: float32. Weights and optimiser stay float32 either way
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow unscaled
    result, first = TrainResult(precision=precision), 0
    if state_file is not None and Path(state_file).is_file():
        first, result.losses, result.seconds = load_train_state(state_file, model, saved_optimizer, ema, generator,
                                                                asdict(config), scaler)
        result.resumed_from, result.resumed_seconds = first, result.seconds
    save_every = config.save_every or max(1, config.steps // 20)
    # What the loss calls: the model itself, wrapped to average gradients over processes, compiled.
    runner = model
    if size > 1 and shard_batch:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        runner = torch.compile(runner)
    pending: list[torch.Tensor] = []  # this window's losses, still on the device

    def read_losses() -> None:  # the one sync of a window
        if pending:
            result.losses.extend(mean_over_processes(torch.stack(pending)).tolist())
            pending.clear()

    start = time.perf_counter() - result.seconds
    bar = tqdm(range(first, config.steps), desc=config.desc, disable=not config.progress or rank != 0,
               initial=first, total=config.steps)
    with shard(rank, size if shard_batch else 1), ExitStack() as at_the_end:
        if flat is not None:  # each weight in its own memory again, as the model came (even if interrupted)
            at_the_end.callback(flat.unflatten)
            if ema is not None:
                at_the_end.callback(ema.unflatten)
        for step in bar:
            for group in optimizer.param_groups:  # warm-up, then cosine decay
                group["lr"] = config.lr * lr_factor(step, config)
            idx = torch.randint(0, n, (config.batch_size,), generator=generator, device=device)  # the global batch
            idx = idx[rank * local:(rank + 1) * local] if shard_batch else idx  # … this process's rows
            batch = tuple(_to(x[idx.to(x.device)], device, memory_format) for x in tensors)
            with torch.autocast(device.type, dtype=autocast) if autocast else nullcontext():
                loss = loss_fn(runner, batch if isinstance(data, tuple) else batch[0], generator)
            if flat is None:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # with several processes, the gradients are averaged over them here
            if flat is not None:
                flat.gather_grads()  # into the flat gradient, which it overwrites whole
            if config.grad_clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                clip_grad_norm(optimized, config.grad_clip)
            scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale lowered
            scaler.update()
            if ema is not None:
                ema.update(model, step)
            pending.append(loss.detach().float())
            last = step == config.steps - 1
            if len(pending) == config.log_every or last:
                read_losses()
                bar.set_postfix(loss=f"{result.smoothed()[-1]:.4f}")
            if hook is not None:
                hook(step, loss.detach())
            if state_file is not None and (step + 1) % save_every == 0 and not last:
                read_losses()  # on every process: with several, this averages the losses over them
                if rank == 0:
                    result.seconds = time.perf_counter() - start
                    save_train_state(state_file, step + 1, result.losses, result.seconds, model, saved_optimizer, ema,
                                     generator, asdict(config), scaler)
    read_losses()
    result.seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format).eval()
    if ema is not None:
        result.ema = ema.model.to(memory_format=torch.contiguous_format)
    return result
