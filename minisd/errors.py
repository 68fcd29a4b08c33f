"""The one exception type a user mistake raises.

`MinisdError` is a `ValueError`, so code that already catches bad values keeps working. The
`minisd` command prints it as one line `error: …` and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class MinisdError(ValueError):
    """A user mistake: a bad value, a missing or corrupt file, a wrong shape."""


_AS_IF_ON_A_GPU = [False]  # set by `minisd bench host` (`as_if_on_a_gpu`), which runs on the CPU


def cheap_to_read(x) -> bool:
    """Whether a check may look at a tensor's values without cost: on the CPU, yes. On a GPU, reading
    a value (`bool(t.any())`, `.item()`) makes the host wait for every queued kernel, once per training
    step, so checks of values (NaN, ids in range) run where the data is on the CPU — before it is
    sent to the GPU — and not inside the training loop's forward pass."""
    return x.device.type == "cpu" and not _AS_IF_ON_A_GPU[0]


class as_if_on_a_gpu:
    """Inside `with as_if_on_a_gpu():` value checks skip as they would for GPU tensors (`cheap_to_read`):
    what `minisd bench host` measures on the CPU is then the host work of the GPU's path."""

    def __enter__(self):
        self.saved, _AS_IF_ON_A_GPU[0] = _AS_IF_ON_A_GPU[0], True

    def __exit__(self, *exc):
        _AS_IF_ON_A_GPU[0] = self.saved


def check_choice(name: str, value, allowed: Iterable) -> None:
    """Raise `MinisdError` unless `value` is one of `allowed`, naming both."""
    allowed = list(allowed)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise MinisdError(f"unknown {name} {value!r}; allowed: {shown}")


def check_count(name: str, n, low: int = 1, high: int | None = None) -> int:
    """Return `n` if it is an integer in [low, high]; else raise `MinisdError` naming it and the range."""
    if isinstance(n, bool) or not isinstance(n, int) or n < low or (high is not None and n > high):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer ≥ {low}"
        raise MinisdError(f"{name} {n!r} is not allowed; use {allowed}")
    return n


def read_json_object(path) -> dict:
    """The JSON object in file `path`; `MinisdError` naming the file if it is not valid JSON or
    not an object (a list, a number)."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinisdError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MinisdError(f"{path} does not hold a JSON object")
    return data
