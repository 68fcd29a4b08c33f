"""Saving and loading a component: `config.json` plus `model.safetensors`, written atomically.

Weights are safetensors, never pickles, so loading a file cannot run code. Each file is written to
a temporary name in the same folder and then renamed, so an interrupted save never leaves a
half-written file where a good one stood.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from minisd.errors import MinisdError

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_module(module: nn.Module, config: dict, folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda tmp: save_model(module, tmp))
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def load_module(cls, config_cls, folder):
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise MinisdError(f"{folder / name} not found; is {str(folder)!r} a folder written by save_pretrained?")
    try:
        raw = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinisdError(f"{folder / CONFIG} is not valid JSON ({e})") from None
    allowed = {f.name for f in fields(config_cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise MinisdError(f"{folder / CONFIG} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    model = cls(config_cls(**raw))
    try:
        missing, unexpected = load_model(model, folder / WEIGHTS, strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise MinisdError(f"{folder / WEIGHTS} could not be read ({e}); the file may be corrupt") from None
    if missing or unexpected:
        raise MinisdError(f"{folder / WEIGHTS} does not match its config: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()
