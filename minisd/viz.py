"""Figures used across the course: image grids with captions, 2-D point clouds, trajectories."""

from __future__ import annotations

import textwrap
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

from minisd.errors import MinisdError


def to_numpy_images(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) uint8, or floats in [0, 1] → (N, H, W, C) floats in [0, 1] for imshow."""
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy()


# Fonts with Japanese glyphs, by family name, and where Debian and Ubuntu install some of them
CJK_FONTS = ("IPAexGothic", "IPAGothic", "Noto Sans CJK JP", "Noto Sans JP", "TakaoGothic", "Hiragino Sans",
             "Yu Gothic", "MS Gothic", "Droid Sans Fallback")
CJK_FONT_FILES = ("/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf",
                  "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
                  "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                  "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf")


def has_cjk(text: str) -> bool:
    """Whether `text` has characters from U+3000 on (CJK punctuation, kana, ideographs)."""
    return any(ord(ch) >= 0x3000 for ch in text)


def cjk_font() -> str | None:
    """The family name of an installed font with Japanese glyphs, registered with matplotlib; None if none."""
    from matplotlib import font_manager

    known = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FONTS if name in known), None)
    if found is None:  # installed after matplotlib built its font list: register the file itself
        from pathlib import Path

        for path in filter(lambda p: Path(p).is_file(), CJK_FONT_FILES):
            font_manager.fontManager.addfont(path)
            return font_manager.FontProperties(fname=path).get_name()
    return found


def font_family(texts) -> list[str] | None:
    """The font family for figure text: None (matplotlib's default) unless `texts` have Japanese
    characters; then the default font with a Japanese one as fallback, glyph by glyph (a warning
    if no such font is installed)."""
    if not any(has_cjk(str(t)) for t in texts if t is not None):
        return None
    font = cjk_font()
    if font is None:
        warnings.warn("the text has Japanese characters but no font with Japanese glyphs was found, so they show as "
                      "boxes; install one, e.g. `sudo apt install fonts-ipafont-gothic`", stacklevel=3)
        return None
    return [plt.rcParams["font.sans-serif"][0], font]


def show_images(images: torch.Tensor, titles: list[str] | None = None, ncols: int = 8,
                size: float = 1.4, suptitle: str | None = None, wrap: int = 18):
    """A grid of images (N, C, H, W) in [0, 1] or uint8, each with an optional title. Returns the figure."""
    arr = to_numpy_images(images)
    n = len(arr)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    extra = 0.35 * (2 if titles else 0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, (size + extra) * nrows + (0.4 if suptitle else 0)),
                             squeeze=False, layout="constrained")  # constrained: room for the suptitle and titles
    family = font_family([*(titles or []), suptitle])  # Japanese captions need a Japanese font
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(arr[k].squeeze(-1) if arr.shape[-1] == 1 else arr[k],
                      cmap="gray" if arr.shape[-1] == 1 else None, interpolation="nearest")
            if titles:
                ax.set_title("\n".join(textwrap.wrap(str(titles[k]), wrap)), fontsize=7, fontfamily=family)
    if suptitle:
        fig.suptitle(suptitle, fontfamily=family)
    return fig


def save_figure(fig, path) -> None:
    """Save a figure atomically (see `minisd.checkpoint.atomic_write`): a failure leaves no
    half-written file and an existing one untouched."""
    from pathlib import Path

    from minisd.checkpoint import atomic_write

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    plt.close(fig)


def plot_points(ax, points: torch.Tensor, title: str | None = None, color: str = "C0",
                lim: float = 3.0, s: float = 2.0) -> None:
    """Scatter 2-D points (N, 2) on a square axis."""
    p = points.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=s, alpha=0.5, color=color, linewidths=0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def show_image_table(images: torch.Tensor, row_labels: list[str] | None = None,
                     col_labels: list[str] | None = None, size: float = 1.2,
                     suptitle: str | None = None):
    """A table of images (R, C, ch, H, W) in [0, 1] or uint8: one row per row label, one column
    per column label (e.g. rows = images or schedules, columns = timesteps). Returns the figure."""
    if images.ndim != 5:
        raise MinisdError(f"images must have shape (R, C, ch, H, W), got {tuple(images.shape)}")
    R, C = images.shape[:2]
    arr = to_numpy_images(images.flatten(0, 1)).reshape(R, C, *images.shape[3:], images.shape[2])
    fig, axes = plt.subplots(R, C, figsize=(size * C + (1.0 if row_labels else 0), size * R + 0.6),
                             squeeze=False)
    family = font_family([*(row_labels or []), *(col_labels or []), suptitle])
    for i in range(R):
        for j in range(C):
            ax = axes[i, j]
            im = arr[i, j]
            ax.imshow(im.squeeze(-1) if im.shape[-1] == 1 else im,
                      cmap="gray" if im.shape[-1] == 1 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and col_labels:
                ax.set_title(str(col_labels[j]), fontsize=8, fontfamily=family)
            if j == 0 and row_labels:
                ax.set_ylabel(str(row_labels[i]), fontsize=8, fontfamily=family)
    if suptitle:
        fig.suptitle(suptitle, fontfamily=family)
    fig.tight_layout()
    return fig
