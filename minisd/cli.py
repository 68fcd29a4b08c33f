"""The `minisd` command.

    minisd data  --dataset shapes --out grid.png            a captioned preview of a dataset or folder
    minisd train  --preset cpu --out runs/cpu [--stages …] [--resume]   train the model into a run folder
    minisd sample --run runs/cpu --prompt "…" --out grid.png           a captioned grid of samples
    minisd eval   --run runs/cpu                  print (and store) each component's figures
    minisd export --run runs/cpu --out DIR        the sampling parts, weights in float16, to ship
                                                  (also turns a diffusers SD folder into a run folder)
    minisd bench  [SUITE …] [--preset cpu] [--quick]  speed figures on this machine (table + bench.json)
    minisd student [NOTEBOOK …] --out student/    the notebooks without their solution cells

A user mistake prints one line `error: …` and exits with status 2; nothing on disk is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minisd.data import DATASETS, EMOJI_DATASETS
from minisd.errors import MinisdError, check_choice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        print(f"error: {message} (see `minisd --help`)", file=sys.stderr)
        raise SystemExit(2)


def _output_path(path: str) -> Path:
    out = Path(path)
    check_choice("output file type", out.suffix.lower(), IMAGE_SUFFIXES)
    if not out.parent.exists():
        raise MinisdError(f"folder {str(out.parent)!r} for --out does not exist; create it first")
    return out


def _measurable(config: dict) -> bool:
    """Whether `minisd eval` has a judge for a run of this config's dataset (Shapes and emoji)."""
    return config.get("dataset") == "shapes" or config.get("dataset") in EMOJI_DATASETS


def cmd_data(args) -> None:
    from minisd.data import load_dataset
    from minisd.viz import save_figure, show_images

    if not 1 <= args.n <= 256:
        raise MinisdError(f"-n {args.n} is out of range; allowed: 1 … 256")
    out = _output_path(args.out)
    ds = load_dataset(args.dataset, args.split, root=args.root, image_size=args.image_size,
                      num_images=args.n, seed=args.seed, download=args.download)
    n = len(ds)  # a folder may hold fewer than -n
    titles = [c if len(c) <= 60 else c[:59] + "…" for c in ds.captions]
    title = "Shapes" if ds.name == "shapes" else ds.name
    seeded = ds.name == "shapes" or ds.name in EMOJI_DATASETS  # drawn, not read from files
    suptitle = f"{title} ({ds.split} split" + (f", seed {args.seed})" if seeded else ")")
    fig = show_images(ds.images, titles, ncols=min(8, n), size=1.6, suptitle=suptitle)
    save_figure(fig, out)
    print(f"wrote {out}: {n} {ds.split} images of {ds.image_size}×{ds.image_size} from {ds.name}")


def cmd_train(args) -> None:
    from minisd import distributed
    from minisd.runs import train_run

    options = {"compile": args.compile, "channels_last": args.channels_last,
               "precision": None if args.precision == "auto" else args.precision}
    metrics = train_run(args.out, args.preset, args.stages, seed=args.seed, device=args.device, resume=args.resume,
                        train_options={k: v for k, v in options.items() if v}, dataset=args.dataset,
                        data_root=args.root)
    if distributed.is_main():
        config = json.loads((Path(args.out) / "config.json").read_text())
        measured = _measurable(config)
        prompt = config.get("example_caption", "…")
        print(f"wrote {args.out} in {metrics['train']['total_wall_seconds']:.0f} s of training; "
              f"sample with `minisd sample --run {args.out} --prompt \"{prompt}\" --out grid.png`"
              + (f", measure with `minisd eval --run {args.out}`" if measured else ""))


def cmd_sample(args) -> None:
    import os
    import tempfile

    from minisd.errors import check_count
    from minisd.pipeline import StableDiffusion, check_guidance
    from minisd.viz import save_figure, show_images

    out = _output_path(args.out)
    try:  # find out now, not after sampling, whether the folder takes a new file
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise MinisdError(f"cannot write {str(out)!r} ({e.strerror or e}); choose another --out") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise MinisdError(f"cannot write {str(out)!r} (permission denied); choose another --out")
    check_count("-n", args.n, 1, 256)
    check_guidance(args.guidance)
    sd = StableDiffusion.from_pretrained(args.run, device=args.device)
    res = sd(args.prompt, num_images=args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
             sampler=args.sampler, seed=args.seed, progress=True)
    titles = [p if i % args.n == 0 and len(args.prompt) > 1 else f"#{i % args.n}" for i, p in enumerate(res.prompts)]
    suptitle = (f"{args.prompt[0]!r}" if len(args.prompt) == 1 else f"{len(args.prompt)} prompts") + \
        f" — {args.sampler}, {args.steps} steps, guidance {args.guidance:g}, seed {args.seed}"
    fig = show_images(res.images, titles, ncols=min(8, args.n) if len(args.prompt) == 1 else args.n,
                      size=1.8, suptitle=suptitle)
    try:
        save_figure(fig, out)
    except OSError as e:
        raise MinisdError(f"cannot write {str(out)!r} ({e.strerror or e})") from None
    print(f"wrote {out}: {len(res.images)} images of {sd.image_size}×{sd.image_size}")


def cmd_eval(args) -> None:
    from minisd.runs import evaluate_run

    evaluate_run(args.run, args.split, device=args.device)
    print(f"figures stored in {Path(args.run) / 'metrics.json'}")


def cmd_export(args) -> None:
    from minisd.runs import export_run

    out = export_run(args.run, args.out, args.dtype)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    measured = _measurable(config)
    print(f"load it with StableDiffusion.from_pretrained({str(args.out)!r})"
          + (f"; measure it with `minisd eval --run {args.out}`" if measured else
             f"; sample with `minisd sample --run {args.out} --prompt \"…\" --out grid.png`"))


def cmd_bench(args) -> None:
    from minisd.bench import format_table, run_bench

    result = run_bench(args.suites, args.run, args.out, args.repeats, args.device, preset=args.preset,
                       compile=not args.no_compile, quick=args.quick)
    print(format_table(result))
    print(f"\nwrote {args.out}")


def cmd_student(args) -> None:
    from minisd.exercises import student_edition

    notebooks = args.notebooks or sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise MinisdError("no notebooks given, and none found under notebooks/ (run from the repository root)")
    for path in student_edition(notebooks, args.out):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minisd", description="A small Stable Diffusion, built from scratch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("data", help="write a captioned preview grid of a dataset")
    d.add_argument("--dataset", default="shapes", metavar="NAME_OR_FOLDER",
                   help=f"one of {', '.join(DATASETS)}, or a folder of images with captions "
                        "(NAME.txt beside each image, or captions.jsonl)")
    d.add_argument("--root", default="data",
                   help="where mnist, fashion-mnist and cifar10 are kept, and emoji renders cached (default data)")
    d.add_argument("--download", action="store_true",
                   help="fetch mnist, fashion-mnist or cifar10 (or the emoji font) into --root first (needs internet)")
    d.add_argument("--out", required=True, help="image file to write (.png, .jpg, .pdf, .svg)")
    d.add_argument("-n", type=int, default=32, help="how many images, the first ones (default 32)")
    d.add_argument("--split", default="train", help="train or test; shapes and emoji also have heldout")
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)

    from minisd.runs import STAGES

    t = sub.add_parser("train", help="train the model's components into a run folder")
    t.add_argument("--preset", default=None,
                   help="tiny (seconds), cpu (minutes on a laptop; the default) or gpu")
    t.add_argument("--out", required=True, help="run folder to create or update, e.g. runs/cpu")
    t.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE",
                   help=f"which components to (re)train, among {', '.join(STAGES)} (default: all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its saved state (same result as if never stopped)")
    t.add_argument("--dataset", default=None,
                   help="shapes (built in, the default), mnist, fashion-mnist, cifar10, emoji (English names), "
                        "emoji-ja (Japanese), emoji-both, or a folder of your own captioned images "
                        "(image.png + image.txt, or captions.jsonl)")
    t.add_argument("--root", default="data",
                   help="where mnist, fashion-mnist, cifar10 and the emoji cache are stored (default data/)")
    t.add_argument("--compile", action="store_true", help="torch.compile each model for training (compiles first)")
    t.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster convolutions on GPUs)")
    t.add_argument("--precision", default="auto",
                   help="forward pass number format: auto = bf16 on GPUs with compute capability ≥ 8.0, "
                        "fp16 + gradient scaling on older GPUs, fp32 on the CPU; or bf16, fp16, fp32")
    t.set_defaults(func=cmd_train)

    from minisd.pipeline import SAMPLER_NAMES

    s = sub.add_parser("sample", help="generate images from a trained run and save a captioned grid")
    s.add_argument("--run", required=True,
                   help="run folder written by `minisd train`, or a diffusers Stable Diffusion 1.x/2.x folder")
    s.add_argument("--prompt", required=True, action="append",
                   help='what to draw, e.g. "a large red circle in the center" (repeat for several prompts)')
    s.add_argument("--out", required=True, help="image file to write (.png, .jpg, .pdf, .svg)")
    s.add_argument("-n", type=int, default=8, help="images per prompt (default 8)")
    s.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    s.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    s.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLER_NAMES)} (default ddim)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    s.set_defaults(func=cmd_sample)

    x = sub.add_parser("export", help="copy a run's sampling parts into a new folder, weights in float16")
    x.add_argument("--run", required=True,
                   help="run folder written by `minisd train`, or a diffusers Stable Diffusion 1.x/2.x folder "
                        "(it becomes a minisd run folder)")
    x.add_argument("--out", required=True, help="new folder to write")
    x.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 or float32")
    x.set_defaults(func=cmd_export)

    e = sub.add_parser("eval", help="measure the trained components of a run folder")
    e.add_argument("--run", required=True, help="run folder written by `minisd train`")
    e.add_argument("--split", default="test", help="test or train (the held-out pairs are always added)")
    e.add_argument("--device", default="auto", help="where the model samples: auto (CUDA if present), cpu, cuda, mps")
    e.set_defaults(func=cmd_eval)
    from minisd.bench import SUITES

    b = sub.add_parser("bench", help="measure speed on this machine: print a table, write JSON")
    b.add_argument("suites", nargs="*", metavar="SUITE", help=f"among {', '.join(SUITES)} (default: all)")
    b.add_argument("--run", default="shapes-cpu", help="model to measure (default: the shipped shapes-cpu)")
    b.add_argument("--out", default="bench.json", help="JSON file to write (default bench.json)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per measure; the median is shown")
    b.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    b.add_argument("--preset", default=None,
                   help="whose U-Net sizes the unet, latent, attention, switches and mfu suites use: "
                        "tiny, cpu (the default) or gpu")
    b.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (faster)")
    b.add_argument("--quick", action="store_true",
                   help="a smoke run: tiny preset sizes, 2 timed steps, few images (for tests)")
    b.set_defaults(func=cmd_bench)

    st = sub.add_parser("student", help="write the notebooks without their solution cells (the student edition)")
    st.add_argument("notebooks", nargs="*", help="notebooks (default: notebooks/[0-9][0-9]_*.ipynb)")
    st.add_argument("--out", required=True, help="folder to write the student edition into")
    st.set_defaults(func=cmd_student)
    return p


def main(argv: list[str] | None = None) -> int:
    from minisd import distributed

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MinisdError as e:
        if distributed.is_main():  # under torchrun every process finds the same mistake: say it once
            print(f"error: {e}", file=sys.stderr)
        distributed.teardown(wait=False)
        return 2
    distributed.teardown()  # under torchrun: leave the process group together, cleanly
    return 0


if __name__ == "__main__":
    sys.exit(main())
