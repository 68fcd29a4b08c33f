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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from minisd.errors import MinisdError

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def normal_mode(path, mode: int = 0o666) -> None:
    """chmod `path` to `mode` less the process's umask: the mode a plain open() or mkdir() would
    give. mkstemp and mkdtemp make their files private (0600, 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path to `path` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        normal_mode(tmp)
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


# --- the training state, for resume ----------------------------------------------------------
# One safetensors file holds everything a resumed run needs, so one atomic rename replaces it:
#   model.*  the weights    ema.*  their average    optim.<i>.<key>  AdamW's moments and step
#   rng.*    the batch generator's and torch's global random state
# and, in the header's metadata, the step, the losses so far, the wall time so far, AdamW's
# hyper-parameters and the training config (a state from another config is refused).

_RESULT_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
                "seed", "ema_decay")


def save_train_state(path, step: int, losses: list[float], seconds: float, model: nn.Module, optimizer,
                     ema, generator, config: dict, scaler=None) -> None:
    """Everything a resume needs, in one safetensors file: the weights, the optimiser's and the EMA's
    state, the random streams, the losses so far and, with fp16, the gradient scaler's scale (a
    resumed run that started again from the initial scale would skip steps the first run took)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema.{k}": v.detach().cpu().clone() for k, v in ema.model.state_dict().items()}
    opt = optimizer.state_dict()
    for i, slots in opt["state"].items():
        tensors |= {f"optim.{i}.{k}": torch.as_tensor(v).detach().cpu().clone() for k, v in slots.items()}
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "losses": losses, "seconds": seconds, "param_groups": opt["param_groups"],
            "config": {k: config[k] for k in _RESULT_KEYS},
            "scaler": scaler.state_dict() if scaler is not None else {}}  # {} when not fp16
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"minisd_train_state": json.dumps(meta)}))


def load_train_state(path, model: nn.Module, optimizer, ema, generator, config: dict, scaler=None):
    """Restore what `save_train_state` wrote into the given objects; returns (step, losses, seconds)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["minisd_train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise MinisdError(f"saved training state {str(path)!r} could not be read ({e}); delete it and train "
                          "the stage again without --resume") from None
    mine = {k: config[k] for k in _RESULT_KEYS}
    if meta["config"] != mine:
        changed = sorted(k for k in mine if meta["config"].get(k) != mine[k])
        raise MinisdError(f"saved training state {str(path)!r} was made with other settings ({', '.join(changed)}); "
                          "train the stage again without --resume")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(part("model."))
        if ema is not None:
            ema.model.load_state_dict(part("ema."))
        state: dict = {}
        for k, v in part("optim.").items():
            i, key = k.split(".", 1)
            state.setdefault(int(i), {})[key] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise MinisdError(f"saved training state {str(path)!r} does not fit this model ({e})") from None
    if scaler is not None and meta.get("scaler"):  # a disabled scaler ignores it
        scaler.load_state_dict(meta["scaler"])
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), list(meta["losses"]), float(meta["seconds"])
