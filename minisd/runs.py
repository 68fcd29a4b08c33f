"""A run folder: the trained components of one model, trained stage by stage, and their figures.

    runs/NAME/
      config.json        preset, seed, dataset, stages trained, versions
      tokenizer.json     the caption vocabulary
      vae/               the VAE                          (stage 'vae',  chapter 6)
      text_encoder/      the CLIP text tower alone        (stage 'clip', chapter 5) — what the U-Net will read
      clip/              the whole CLIP, both towers      (stage 'clip') — for zero-shot and retrieval figures
      unet/              the conditional latent U-Net (EMA weights)  (stage 'unet', chapter 7)
      metrics.json       per stage: wall time, losses; per evaluation: the figures
      train_state/       while a stage trains: what `--resume` needs (weights, optimiser, EMA, RNG)
      cache/             the training images encoded to latents, keyed on the VAE's weights

Every file is written atomically, so an interrupted command never leaves a half-written file
where a good one stood. `minisd train` and `minisd eval` are thin wrappers around this module.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from minisd.checkpoint import atomic_write, normal_mode
from minisd.errors import MinisdError, check_choice

STAGES = ("vae", "clip", "unet")  # in training order
DEPENDS = {"vae": set(), "clip": set(), "unet": {"vae", "clip"}}  # the U-Net learns on their outputs


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n"))


def read_json(path: Path, missing: dict | None = None) -> dict:
    """The JSON object in `path`; `missing` (if given) when there is no such file."""
    if missing is not None and not path.is_file():
        return missing
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinisdError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None


def _check_run_folder(out: Path, preset: str | None, resume: bool) -> dict:
    """The run's config.json, new or existing; refuses a folder that is not a run (of this preset)."""
    if out.exists() and not out.is_dir():
        raise MinisdError(f"--out {str(out)!r} is a file, not a folder")
    if (out / "config.json").is_file():
        config = read_json(out / "config.json")
        if preset is not None and config.get("preset") != preset:
            raise MinisdError(f"{str(out)!r} holds a run of preset {config.get('preset')!r}, not {preset!r}; "
                              "choose another --out")
        return config
    if resume:
        raise MinisdError(f"no saved state in {str(out)!r} to resume; start the run without --resume")
    if out.is_dir() and any(out.iterdir()):
        raise MinisdError(f"{str(out)!r} exists and is not a minisd run folder; choose an empty or new folder")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise MinisdError(f"cannot make run folder {str(out)!r}: {str(blocking)!r} is a file")
    return {"preset": preset or "cpu", "dataset": "shapes", "stages": {}}


def _plan(config: dict, out: Path, stages, resume: bool) -> list[str]:
    """Which stages to train now, in order."""
    done = set(config["stages"])
    if resume:
        todo = [s for s in STAGES if s in stages and s not in done]
        if not todo:
            raise MinisdError(f"the run in {str(out)!r} is complete (stages {', '.join(sorted(done))}); "
                              "nothing to resume")
        return todo
    todo = [s for s in STAGES if s in stages]
    for s in todo:
        missing = DEPENDS[s] - done - set(todo)
        if missing:
            raise MinisdError(f"the {s} stage needs a trained {' and '.join(sorted(missing))}, which "
                              f"{str(out)!r} does not have; add {' '.join(sorted(missing))} to --stages")
    stale = [s for s in STAGES if s in done and s not in todo and any(DEPENDS[s] & set(todo))]
    if stale:
        raise MinisdError(f"retraining {' and '.join(sorted(DEPENDS[stale[0]] & set(todo)))} would leave the "
                          f"trained {stale[0]} of {str(out)!r} out of date; add {stale[0]} to --stages")
    return todo


def train_run(out, preset: str | None = None, stages=STAGES, seed: int = 0, device: str = "auto",
              progress: bool = True, log=print, resume: bool = False, train_options: dict | None = None,
              dataset: str | None = None, data_root: str = "data") -> dict:
    """Train the given stages into run folder `out` (created if needed); returns metrics.json's content.

    preset: None means 'cpu' for a new run and the run's own preset when resuming.
    resume: continue an interrupted run from its saved training state (train_state/): stages
    already finished are kept, the interrupted one goes on from its last saved step and ends with
    the same weights as an uninterrupted run. Without it, the asked-for stages train afresh.

    dataset: 'shapes' (the default for a new run), 'mnist', 'fashion-mnist', 'cifar10' (read from
    `data_root`), or the path of a folder of your own captioned images (see
    `minisd.data.load_dataset`); a run keeps the dataset it was started with.
    train_options: `TrainConfig` speed switches for every stage, e.g. {"compile": True,
    "channels_last": True} (see `minisd bench switches` for what each is worth on this machine).

    Under torchrun (several processes, see `minisd.distributed`) every process trains every stage
    on its slice of each batch; rank 0 alone writes files and prints, and the others wait for it.
    """
    import minisd
    from minisd import distributed
    from minisd.pipeline import SCHEDULE
    from minisd.train import IMAGE_SIZES, PRECISION_NOTES, PRESETS, choose_precision, pick_device

    if preset is not None:
        check_choice("preset", preset, PRESETS)
    stages = list(dict.fromkeys(stages))
    for s in stages:
        check_choice("stage", s, STAGES)
    out = Path(out)
    rank, size = distributed.setup(pick_device(device))
    main = rank == 0
    if not main:
        log, progress = (lambda *a, **k: None), False
    config = _check_run_folder(out, preset, resume)
    check_choice("preset", config.get("preset"), PRESETS)
    if resume:
        seed = config.get("seed", seed)
    todo = _plan(config, out, stages, resume)
    precision = choose_precision((train_options or {}).get("precision", "auto"), pick_device(device))
    if dataset is not None and config["stages"] and dataset != config.get("dataset", "shapes"):
        raise MinisdError(f"{str(out)!r} holds a run trained on {config.get('dataset')!r}, not {dataset!r}; "
                          "choose another --out")
    if not config["stages"] and dataset is not None:
        config.update(dataset=dataset, data_root=str(data_root))
    data = _load_training_data(config)  # before anything is written: a missing dataset fails first
    config["example_caption"] = "a large red circle in the center" if data is None else data.texts[0]
    distributed.barrier()  # every process has read the folder as it was before rank 0 writes to it
    if size > 1:
        log(f"training on {size} processes ({torch.distributed.get_backend()}), rank 0 writes")
    for stage in todo:  # not finished until trained again: an interruption now leaves them to --resume
        config["stages"].pop(stage, None)
    image_size = IMAGE_SIZES[config["preset"]]
    config.update(seed=seed, pipeline={"schedule": SCHEDULE, "image_size": image_size, "prediction_type": "epsilon"},
                  versions={"minisd": minisd.__version__, "torch": torch.__version__,
                            "python": platform.python_version()})
    if main:
        out.mkdir(parents=True, exist_ok=True)  # runs/NAME: the runs/ folder is made too
        write_json(out / "config.json", config)
    metrics = read_json(out / "metrics.json", missing={})
    metrics.setdefault("train", {})
    log(f"precision: {PRECISION_NOTES[precision]}")  # chosen once for every stage (see choose_precision)
    for stage in todo:
        state_file = out / "train_state" / f"{stage}.safetensors"
        if not resume and main:
            state_file.unlink(missing_ok=True)
        elif state_file.is_file():
            log(f"{stage}: resuming from {state_file}")
        distributed.barrier()  # no process may read a stale state file
        begin = time.perf_counter()
        result = _train_stage(stage, out, config, seed, device, progress, state_file, log, main,
                              train_options or {}, data)
        distributed.barrier()  # the stage's files are written before anyone reads them
        wall = time.perf_counter() - begin
        metrics["train"][stage] = {
            "seconds": round(result.seconds, 1),  # the training steps, over every session
            "wall_seconds": round(result.resumed_seconds + wall, 1),  # with data, encoding and saving
            "steps": len(result.losses), "resumed_from": result.resumed_from, "precision": result.precision,
            "final_loss": result.smoothed()[-1], "losses": result.losses[::10]}
        metrics["train"]["total_wall_seconds"] = round(sum(metrics["train"][s]["wall_seconds"]
                                                           for s in STAGES if s in metrics["train"]), 1)
        log(f"{stage}: trained in {wall:.0f} s, final loss {result.smoothed()[-1]:.4f}")
        if main:
            write_json(out / "config.json", config)
            write_json(out / "metrics.json", metrics)
            state_file.unlink(missing_ok=True)
    if main and (out / "train_state").is_dir() and not any((out / "train_state").iterdir()):
        (out / "train_state").rmdir()
    return metrics


def _load_training_data(config: dict):
    """The run's training images as `CaptionedImages`, or None for Shapes (each stage renders its own)."""
    from minisd.data import load_dataset
    from minisd.train import IMAGE_SIZES

    name = config.get("dataset", "shapes")
    if name == "shapes":
        return None
    return load_dataset(name, "train", root=config.get("data_root", "data"),
                        image_size=IMAGE_SIZES[config["preset"]], seed=config.get("seed", 0))


def _train_stage(stage: str, out: Path, config: dict, seed: int, device: str, progress: bool, state_file, log,
                 main: bool = True, options: dict | None = None, data=None):
    """Train one stage, save its component(s) (if `main`: rank 0) and record its config in `config`.
    data: the training images when the run is not on Shapes (`_load_training_data`)."""
    from minisd import distributed

    preset = config["preset"]
    if stage == "vae":
        from minisd.vae import PRESET_IMAGES, train_vae

        images = None if data is None else data.images[:PRESET_IMAGES[preset]]
        model, result = train_vae(preset, images, seed=seed, device=device, progress=progress, state_file=state_file,
                                  train_options=options)
        if main:
            model.save_pretrained(out / "vae")
        config["stages"]["vae"] = asdict(model.config)
    elif stage == "clip":
        from minisd.clip import CLIP_IMAGES, train_clip

        extra = {} if data is None else {"images": data.images[:CLIP_IMAGES[preset]],
                                         "labels": data.caption_ids[:CLIP_IMAGES[preset]], "texts": data.texts}
        model, tokenizer, result = train_clip(preset, seed=seed, device=device, progress=progress,
                                              state_file=state_file, train_options=options, **extra)
        if main:
            tokenizer.save(out / "tokenizer.json")
            model.text_encoder.save_pretrained(out / "text_encoder")
            model.save_pretrained(out / "clip")
        config["stages"]["clip"] = asdict(model.config)
    else:
        from minisd.clip import TextEncoder
        from minisd.pipeline import cached_latents, train_unet, unet_presets
        from minisd.tokenizer import Tokenizer
        from minisd.train import pick_device
        from minisd.vae import VAE

        vae = VAE.from_pretrained(out / "vae").to(pick_device(device))
        text_encoder = TextEncoder.from_pretrained(out / "text_encoder")
        tokenizer = Tokenizer.load(out / "tokenizer.json")
        begin = time.perf_counter()
        cache = out / "cache" / "latents.safetensors", out / "vae" / "model.safetensors"
        size = config["pipeline"]["image_size"]
        if main:  # rank 0 encodes and writes the cache; the others then read it
            latents, labels = cached_latents(*cache, vae, unet_presets()[preset][2], seed, progress=progress,
                                             image_size=size, dataset=data)
        distributed.barrier()
        if not main:
            latents, labels = cached_latents(*cache, vae, unet_presets()[preset][2], seed, image_size=size,
                                             dataset=data)
        log(f"unet: {len(latents)} training images as latents {tuple(latents.shape[1:])} "
            f"in {time.perf_counter() - begin:.0f} s (cached in {out / 'cache'})")
        model, result = train_unet(preset, vae, text_encoder, tokenizer, latents=latents, labels=labels, seed=seed,
                                   device=device, progress=progress, state_file=state_file, train_options=options,
                                   texts=None if data is None else data.texts)
        if main:
            model.save_pretrained(out / "unet")
        config["stages"]["unet"] = asdict(model.config)
    return result


# What `minisd eval` measures a whole model with: (sampler, steps), each at guidance 4.
EVAL_SAMPLERS = (("ddim", 20), ("dpmsolver++", 10))
EVAL_GUIDANCE = 4.0


def evaluate_run(run, split: str = "test", log=print, progress: bool = True, device: str = "auto") -> dict:
    """Evaluate every trained component of run folder `run` on a Shapes split (and the held-out
    pairs); print the figures and store them in metrics.json under 'eval'. With a U-Net, the
    whole model: prompt accuracy and FID read by the judge, for each of `EVAL_SAMPLERS`. A run
    trained on emoji is measured as a whole model by the emoji judge instead (`evaluate_emoji`).
    device: where the whole model samples and the judge reads ('auto': CUDA if present)."""
    from minisd.data import EMOJI_DATASETS, SPLITS
    from minisd.train import pick_device

    check_choice("split", split, SPLITS)
    device = str(pick_device(device))
    run = Path(run)
    if not run.is_dir():
        raise MinisdError(f"run folder {str(run)!r} not found; train one with `minisd train --out {run}`")
    present = [s for s in STAGES if (run / s).exists()]  # each stage's component lives in a folder of its name
    if not present:
        raise MinisdError(f"{str(run)!r} has no trained component (looked for {', '.join(s + '/' for s in STAGES)})")
    run_config = read_json(run / "config.json", missing={})
    if run_config.get("dataset", "shapes") in EMOJI_DATASETS:
        return _evaluate_emoji_run(run, run_config, present, device, progress, log)
    if run_config.get("dataset", "shapes") != "shapes":
        raise MinisdError(f"{str(run)!r} was trained on {run_config['dataset']!r}; `minisd eval` measures Shapes and "
                          "emoji runs (their judges read what each sample shows). Look at samples with `minisd sample`")
    image_size = run_config.get("pipeline", {}).get("image_size", 32)
    models = {}  # load everything first: a damaged file fails before minutes of evaluation
    if "vae" in present:
        from minisd.vae import VAE, evaluate_vae, format_vae_metrics

        models["vae"] = VAE.from_pretrained(run / "vae")
    if "clip" in present:
        from minisd.clip import CLIP, evaluate_clip
        from minisd.tokenizer import Tokenizer

        models["clip"] = (CLIP.from_pretrained(run / "clip"), Tokenizer.load(run / "tokenizer.json"))
    if "unet" in present:
        from minisd.metrics import evaluate_pipeline, load_judge
        from minisd.pipeline import StableDiffusion

        models["unet"] = StableDiffusion.from_pretrained(run, device=device)
        judge, judge_acc = load_judge(device=device, progress=progress, log=log)
    figures: dict[str, dict] = {}
    for stage in present:
        for part in dict.fromkeys([split, "heldout"]):
            if stage == "vae":
                result = evaluate_vae(models["vae"], split=part, image_size=image_size)
                lines = format_vae_metrics(result).splitlines()
                figures[f"vae/{part}"] = result
            elif stage == "clip":
                result = evaluate_clip(*models["clip"], part)
                lines = ["  ".join(f"{k} {100 * v:.1f}%" for k, v in result.items())]  # all fractions
                figures[f"clip/{part}"] = result
            else:
                lines = ["judge on real images: " + "  ".join(
                    f"{k.split('/')[1]} {100 * v:.1f}%" for k, v in judge_acc.items() if k.startswith(part))]
                for sampler, steps in EVAL_SAMPLERS:
                    result = evaluate_pipeline(models["unet"], judge, part, sampler, steps, EVAL_GUIDANCE,
                                               progress=progress)
                    figures[f"sd/{part}/{sampler}-{steps}"] = result
                    lines += format_pipeline_metrics(result, f"{sampler} {steps} steps, guidance {EVAL_GUIDANCE:g}")
                figures["judge"] = judge_acc
            name = "sd" if stage == "unet" else stage
            log(f"{name:4s} {part:8s} {lines[0]}")
            for line in lines[1:]:
                log(f"{'':14s}{line}")
    metrics = read_json(run / "metrics.json", missing={})
    metrics.setdefault("eval", {}).update(figures)
    write_json(run / "metrics.json", metrics)
    return figures


def _evaluate_emoji_run(run: Path, run_config: dict, present: list[str], device: str, progress: bool, log) -> dict:
    """`evaluate_run` for a run trained on emoji: the whole model's prompt fidelity and FID, read by
    the emoji judge, with the prompts in each language the run was trained on."""
    from minisd.data import EMOJI_DATASETS
    from minisd.emojis import evaluate_emoji, format_emoji_metrics, load_emoji_judge
    from minisd.pipeline import StableDiffusion

    if "unet" not in present:
        raise MinisdError(f"{str(run)!r} has no trained U-Net; `minisd eval` measures an emoji run's whole model")
    root = run_config.get("data_root", "data")
    sd = StableDiffusion.from_pretrained(run, device=device)
    judge, judge_acc = load_emoji_judge(root, device=device, progress=progress, log=log)
    log("judge on real renders: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in judge_acc.items()))
    figures: dict[str, dict] = {"emoji_judge": judge_acc}
    captions = EMOJI_DATASETS[run_config["dataset"]]
    langs = ("en", "ja") if captions == "both" else (captions,)  # prompt in each language it was trained on
    for lang in langs:
        result = evaluate_emoji(sd, judge, root, lang=lang, guidance_scale=EVAL_GUIDANCE, progress=progress)
        figures[f"sd/emoji-{lang}"] = result
        for line in format_emoji_metrics(result):
            log(line)
    metrics = read_json(run / "metrics.json", missing={})
    metrics.setdefault("eval", {}).update(figures)
    write_json(run / "metrics.json", metrics)
    return figures


def format_pipeline_metrics(r: dict, setting: str) -> list[str]:
    """`evaluate_pipeline`'s figures as lines, each with its 95 % interval."""
    from minisd.metrics import format_interval

    return [f"{setting}, {r['num_images']} images, {r['seconds']:.0f} s",
            "  prompt accuracy " + "  ".join(f"{k} {format_interval(r[k], r[k + '_ci'], percent=True)}"
                                           for k in ("all", "color", "shape", "size", "position")) + "  (the judge's reading)",
            f"  FID {format_interval(r['fid'], r['fid_ci'], digits=2)} against a real set with the same prompts;"
            f" real vs real {format_interval(r['fid_reference'], r['fid_reference_ci'], digits=2)};"
            f" excess {format_interval(r['fid_excess'], r['fid_excess_ci'], digits=2)}",
            f"  diversity {r['diversity']:.2f} (pairwise distance within a prompt / real's)  geometric reader:"
            f" all {100 * r['geometric_all']:.1f}%, agrees with the judge on "
            + "  ".join(f"{k} {100 * r['agreement_' + k]:.1f}%" for k in ("all", "color", "shape", "size", "position"))]


EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def export_run(run, out, dtype: str = "float16", log=print) -> Path:
    """Write what sampling needs from `run` — config.json, the tokenizer, metrics.json, vae/,
    text_encoder/, unet/ — into a new folder `out`, with the weights stored as `dtype` (loading
    casts them back to float32). `run` is a run folder of `minisd train` or a diffusers-format
    Stable Diffusion folder, which becomes a minisd run folder (its pipeline settings in
    config.json, CLIP's tokenizer as tokenizer/). This is how a trained model is shipped: float16
    halves the files and changes the sampled images by less than the eye can see. The folder is
    written beside `out` and renamed into place at the end: an interrupted export leaves no `out`."""
    from minisd.pipeline import StableDiffusion

    check_choice("dtype", dtype, EXPORT_DTYPES)
    run, out = Path(run), Path(out)
    sd = StableDiffusion.from_pretrained(run)  # checks the run is complete and consistent
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinisdError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    if not out.parent.exists():
        raise MinisdError(f"folder {str(out.parent)!r} for --out does not exist; create it first")
    cast = getattr(torch, dtype)
    for module in (sd.vae, sd.text_encoder, sd.unet):
        module.to(cast)
    diffusers_folder = (run / "model_index.json").is_file()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd.save_pretrained(tmp)
        # a run's own config.json has its preset, seed and every stage's config; a diffusers folder's
        # settings are those save_pretrained wrote (schedule, image size, the pipeline options)
        config = read_json(tmp / "config.json") if diffusers_folder else read_json(run / "config.json")
        config["exported"] = {"from": str(run), "dtype": dtype,
                              "format": "diffusers Stable Diffusion folder" if diffusers_folder else "minisd run"}
        write_json(tmp / "config.json", config)
        metrics = read_json(run / "metrics.json", missing={})
        metrics.pop("eval", None)  # figures belong to the weights they were measured on: evaluate the export
        write_json(tmp / "metrics.json", metrics)
        normal_mode(tmp, 0o777)
        os.replace(tmp, out)  # `out` is absent or an empty folder: the rename replaces it whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"exported {run} to {out} ({dtype} weights, {size / 1e6:.1f} MB)")
    return out
