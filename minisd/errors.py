"""The one exception type a user mistake raises.

`MinisdError` is a `ValueError`, so code that already catches bad values keeps working. The
`minisd` command prints it as one line `error: …` and exits with status 2.
"""

from __future__ import annotations

from collections.abc import Iterable


class MinisdError(ValueError):
    """A user mistake: a bad value, a missing or corrupt file, a wrong shape."""


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
