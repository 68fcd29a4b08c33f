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
