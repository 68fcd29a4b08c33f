"""A run folder: the trained components of one model, trained stage by stage, and their figures.

    runs/NAME/
      config.json        preset, seed, dataset, stages trained, versions
      tokenizer.json     the caption vocabulary
      vae/               the VAE                          (stage 'vae',  chapter 6)
      text_encoder/      the CLIP text tower alone        (stage 'clip', chapter 5) — what the U-Net will read
      clip/              the whole CLIP, both towers      (stage 'clip') — for zero-shot and retrieval figures
      metrics.json       per stage: wall time, losses; per evaluation: the figures

Every file is written atomically, so an interrupted command never leaves a half-written file
where a good one stood. `minisd train` and `minisd eval` are thin wrappers around this module.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from minisd.checkpoint import atomic_write
from minisd.errors import MinisdError, check_choice

STAGES = ("vae", "clip")  # in training order; the conditional U-Net joins in chapter 7


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinisdError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None


def _check_run_folder(out: Path, preset: str) -> dict:
    """The run's config.json, new or existing; refuses a folder that is not a run of this preset."""
    if out.exists() and not out.is_dir():
        raise MinisdError(f"--out {str(out)!r} is a file, not a folder")
    if (out / "config.json").is_file():
        config = _read_json(out / "config.json")
        if config.get("preset") != preset:
            raise MinisdError(f"{str(out)!r} holds a run of preset {config.get('preset')!r}, not {preset!r}; "
                              "choose another --out")
        return config
    if out.is_dir() and any(out.iterdir()):
        raise MinisdError(f"{str(out)!r} exists and is not a minisd run folder; choose an empty or new folder")
    if not out.parent.exists():
        raise MinisdError(f"folder {str(out.parent)!r} for --out does not exist; create it first")
    return {"preset": preset, "dataset": "shapes", "stages": {}}


def train_run(out, preset: str = "cpu", stages=STAGES, seed: int = 0, device: str = "auto",
              progress: bool = True, log=print) -> dict:
    """Train the given stages into run folder `out` (created if needed); returns metrics.json's content."""
    from dataclasses import asdict

    import minisd
    from minisd.train import PRESETS

    check_choice("preset", preset, PRESETS)
    stages = list(dict.fromkeys(stages))
    for s in stages:
        check_choice("stage", s, STAGES)
    out = Path(out)
    config = _check_run_folder(out, preset)
    out.mkdir(exist_ok=True)
    config.update(seed=seed, versions={"minisd": minisd.__version__, "torch": torch.__version__,
                                       "python": platform.python_version()})
    metrics = _read_json(out / "metrics.json") if (out / "metrics.json").is_file() else {}
    metrics.setdefault("train", {})
    for stage in (s for s in STAGES if s in stages):
        if stage == "vae":
            from minisd.vae import train_vae

            model, result = train_vae(preset, seed=seed, device=device, progress=progress)
            model.save_pretrained(out / "vae")
            config["stages"]["vae"] = asdict(model.config)
        else:
            from minisd.clip import train_clip

            model, tokenizer, result = train_clip(preset, seed=seed, device=device, progress=progress)
            tokenizer.save(out / "tokenizer.json")
            model.text_encoder.save_pretrained(out / "text_encoder")
            model.save_pretrained(out / "clip")
            config["stages"]["clip"] = asdict(model.config)
        metrics["train"][stage] = {"seconds": round(result.seconds, 1), "steps": len(result.losses),
                                   "final_loss": result.smoothed()[-1], "losses": result.losses[::10]}
        log(f"{stage}: trained in {result.seconds:.0f} s, final loss {result.smoothed()[-1]:.4f}")
        _write_json(out / "config.json", config)
        _write_json(out / "metrics.json", metrics)
    return metrics


def evaluate_run(run, split: str = "test", log=print) -> dict:
    """Evaluate every trained component of run folder `run` on a Shapes split (and the held-out
    pairs); print the figures and store them in metrics.json under 'eval'."""
    from minisd.data import SPLITS

    check_choice("split", split, SPLITS)
    run = Path(run)
    if not run.is_dir():
        raise MinisdError(f"run folder {str(run)!r} not found; train one with `minisd train --out {run}`")
    present = [s for s in STAGES if (run / s / "model.safetensors").exists() or (run / s / "config.json").exists()]
    if not present:
        raise MinisdError(f"{str(run)!r} has no trained component (looked for {', '.join(s + '/' for s in STAGES)})")
    models = {}  # load everything first: a damaged file fails before minutes of evaluation
    if "vae" in present:
        from minisd.vae import VAE, evaluate_vae, format_vae_metrics

        models["vae"] = VAE.from_pretrained(run / "vae")
    if "clip" in present:
        from minisd.clip import CLIP, evaluate_clip
        from minisd.tokenizer import Tokenizer

        models["clip"] = (CLIP.from_pretrained(run / "clip"), Tokenizer.load(run / "tokenizer.json"))
    figures: dict[str, dict] = {}
    for stage in present:
        for part in dict.fromkeys([split, "heldout"]):
            if stage == "vae":
                result = evaluate_vae(models["vae"], split=part)
                lines = format_vae_metrics(result).splitlines()
            else:
                result = evaluate_clip(*models["clip"], part)
                lines = ["  ".join(f"{k} {100 * v:.1f}%" for k, v in result.items())]  # all fractions
            figures[f"{stage}/{part}"] = result
            log(f"{stage:4s} {part:8s} {lines[0]}")
            for line in lines[1:]:
                log(f"{'':14s}{line}")
    metrics = _read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    metrics.setdefault("eval", {}).update(figures)
    _write_json(run / "metrics.json", metrics)
    return figures

