"""The `minisd` command.

    minisd data --dataset shapes --out grid.png     a captioned preview of the built-in dataset

A user mistake prints one line `error: …` and exits with status 2; nothing on disk is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minisd.errors import MinisdError, check_choice

DATASETS = ("shapes",)
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


def cmd_data(args) -> None:
    from minisd.data import SPLITS, Shapes
    from minisd.viz import save_figure, show_images

    check_choice("dataset", args.dataset, DATASETS)
    check_choice("split", args.split, SPLITS)
    if not 1 <= args.n <= 256:
        raise MinisdError(f"-n {args.n} is out of range; allowed: 1 … 256")
    out = _output_path(args.out)
    ds = Shapes(args.split, num_images=args.n, image_size=args.image_size, seed=args.seed)
    fig = show_images(ds.images, ds.captions, ncols=min(8, args.n), size=1.6,
                      suptitle=f"Shapes ({args.split} split, seed {args.seed})")
    save_figure(fig, out)
    print(f"wrote {out}: {args.n} {args.split} images of {args.image_size}×{args.image_size}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minisd", description="A small Stable Diffusion, built from scratch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("data", help="write a captioned preview grid of a dataset")
    d.add_argument("--dataset", default="shapes", help=f"one of {', '.join(DATASETS)}")
    d.add_argument("--out", required=True, help="image file to write (.png, .jpg, .pdf, .svg)")
    d.add_argument("-n", type=int, default=32, help="how many images (default 32)")
    d.add_argument("--split", default="train", help="train, test or heldout")
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MinisdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
