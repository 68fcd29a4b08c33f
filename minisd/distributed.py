"""Data-parallel training on several processes, with PyTorch's own engine (torch.distributed).

    torchrun --standalone --nproc_per_node=2 -m minisd train --preset gpu --out runs/gpu

`torchrun` starts N copies of the command and tells each its RANK (0 … N−1), WORLD_SIZE (N) and
LOCAL_RANK (its GPU on this machine). Every process holds the whole model. Each training step,
every process draws the same global batch of `batch_size` rows (from the same seeded generator)
and computes the loss on its own slice of batch_size / N rows; DistributedDataParallel averages
the gradients across processes during the backward pass, so every process takes the same
optimiser step — the step a single process would take on the whole batch.

The randomness a loss draws per row (timesteps, noise, caption variants, the VAE's posterior
sample) goes through `rows`: each process draws it for the whole global batch and keeps its own
slice. A run on N processes therefore sees exactly the numbers a single process would, and ends
with the same weights up to the rounding of the summed gradients (tests/test_distributed.py).

Backends: NCCL between CUDA GPUs, Gloo on the CPU. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from minisd.errors import MinisdError

_SHARD = (0, 1)  # (rank, world size) whose slice of each batch this process computes, inside `train`


def world() -> tuple[int, int]:
    """(rank, world size) of this process: from torchrun's environment, (0, 1) when run alone."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise MinisdError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                          "must be integers (torchrun sets them)") from None


def is_main() -> bool:
    """True in the process that writes files and prints: rank 0, or the only process."""
    return world()[0] == 0


def setup(device: torch.device) -> tuple[int, int]:
    """Join the process group once when started by torchrun with WORLD_SIZE > 1 (NCCL for CUDA,
    Gloo for the CPU); on CUDA, each process takes the GPU of its LOCAL_RANK. Returns (rank, world)."""
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend)
    return rank, size


def teardown(wait: bool = True) -> None:
    """Leave the process group, if this process joined one: all processes meet first (`wait`),
    which avoids an occasional abort at exit; after an error, leave without waiting."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (no-op when run alone): e.g. until rank 0 has written a file."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class shard:
    """Inside `with shard(rank, size):`, `rows` gives this process its slice of each batch."""

    def __init__(self, rank: int, size: int):
        self.value = (rank, size)

    def __enter__(self):
        global _SHARD
        self.saved, _SHARD = _SHARD, self.value

    def __exit__(self, *exc):
        global _SHARD
        _SHARD = self.saved


def rows(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """`draw(m)` draws random values for m rows of a batch. Returns this process's n rows: alone,
    simply draw(n); in data-parallel training, draw(n · world) — the whole global batch, the same
    numbers on every process — and keep the slice of this rank. This is what makes a run on N
    processes equal to a run on one."""
    rank, size = _SHARD
    if size == 1:
        return draw(n)
    return draw(n * size)[rank * n:(rank + 1) * n]


def draw_device(generator: torch.Generator | None) -> torch.device:
    """Where to draw with `generator`: its own device (the training loop's lives on the training
    device, so a GPU's random numbers are made on the GPU); the CPU when there is none."""
    return generator.device if generator is not None else torch.device("cpu")


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (itself when alone): e.g. the loss of the global batch."""
    if _SHARD[1] == 1 or not torch.distributed.is_initialized():
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value / _SHARD[1]
