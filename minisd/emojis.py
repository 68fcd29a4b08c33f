"""Emoji: real pictures with real words, in English and Japanese.

Each image is one emoji of the Noto Color Emoji font (OFL), drawn at a random size and place on a
white background; its caption is the emoji's CLDR short name from the `emoji` package (PyPI), e.g.

    🍎  "red apple"  /  "赤リンゴ"        🟦  "blue square"  /  "青い四角"

Only emoji of one code point (with or without the variation selector U+FE0F) are used: those
draw the same on every machine. Sequences — skin tones, flags, families joined by U+200D — need
a text-shaping library to become one picture, so they are left out. With the font Debian ships
(version 2.042) that leaves 1,377 emoji. A few colour × object pairs (`HELD_OUT`) are kept out of
the train and test splits: the 'heldout' split holds only them, to test composition.

The font is looked for in `root` (where `download_font` puts it) and where Linux distributions
install it; the renders are cached in `root/cache/`.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from minisd.errors import MinisdError

LANGUAGES = ("en", "ja", "both")
FONT_FILE = "NotoColorEmoji.ttf"
FONT_PLACES = (  # where distributions install it: Debian/Ubuntu, Fedora, Arch
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
# Debian's package of the font: the same file `apt install fonts-noto-color-emoji` installs.
FONT_PACKAGE_URL = ("http://deb.debian.org/debian/pool/main/f/fonts-noto-color-emoji/"
                    "fonts-noto-color-emoji_2.042-0+deb12u1_all.deb")
FONT_PACKAGE_SHA256 = "a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751"
FONT_SHA256 = "e5899ed38b8ed83e08bd3ac5de09791e9d19d288333a796de1d35ad17396f1ec"  # the .ttf inside it
FONT_MEMBER = "./usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
GLYPH_SIZE = 109  # the only size of the font's colour bitmaps
BASE = 72  # side of the cached render of each emoji, in pixels

# colour × object pairs never shown in training: every colour and every object still is, elsewhere
HELD_OUT = ("green heart", "purple circle", "orange square")
DEFAULT_SIZES = {"train": 20_000, "test": 2_000, "heldout": 300}
_SPLIT_SEED = {"train": 0, "test": 1_000_003, "heldout": 2_000_029}
_SCALE = (0.7, 0.95)  # the emoji's side as a fraction of the image's


def find_font(root: str | Path = "data") -> Path:
    """The Noto Color Emoji font file: in `root`, else where Linux distributions install it."""
    for place in (Path(root) / FONT_FILE, *map(Path, FONT_PLACES)):
        if place.is_file():
            return place
    raise MinisdError(f"the Noto Color Emoji font ({FONT_FILE}) is not in {str(root)!r} nor in "
                      f"{', '.join(FONT_PLACES)}; install it (`sudo apt install fonts-noto-color-emoji`) "
                      f"or fetch it with `minisd data --dataset emoji --download` (needs internet)")


def download_font(root: str | Path = "data", url: str = FONT_PACKAGE_URL) -> Path:
    """Fetch Debian's font package, check its SHA-256, and write the font into `root`."""
    from minisd.checkpoint import atomic_write

    root = Path(root)
    if (root / FONT_FILE).is_file():
        return root / FONT_FILE
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            package = response.read()
    except OSError as e:
        raise MinisdError(f"could not download the emoji font from {url}: {e}") from None
    if hashlib.sha256(package).hexdigest() != FONT_PACKAGE_SHA256:
        raise MinisdError(f"the file at {url} is not the expected font package (SHA-256 differs); nothing written")
    font = _member_of_deb(package, FONT_MEMBER)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / FONT_FILE, lambda tmp: Path(tmp).write_bytes(font))
    return root / FONT_FILE


def _member_of_deb(package: bytes, member: str) -> bytes:
    """One file out of a .deb: an `ar` archive whose data.tar.* holds the installed files."""
    if not package.startswith(b"!<arch>\n"):
        raise MinisdError("the font package is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(package):
        name, size = package[pos:pos + 16].decode().strip(), int(package[pos + 48:pos + 58].decode())
        body = package[pos + 60:pos + 60 + size]
        if name.rstrip("/").startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                try:
                    return tar.extractfile(member).read()
                except (KeyError, AttributeError):  # not there, or not a regular file
                    break
        pos += 60 + size + size % 2  # members are padded to an even length
    raise MinisdError(f"the font package holds no {member}")


def emoji_table(font: Path) -> tuple[list[str], list[str], list[str]]:
    """(emoji, English names, Japanese names) of every one-code-point emoji the font draws, in the
    `emoji` package's order."""
    return _emoji_table(str(font))


@lru_cache(maxsize=4)
def _emoji_table(font: str):
    emoji = _emoji_package()
    data = emoji.EMOJI_DATA
    chars = [e for e, d in data.items()
             if d["status"] == emoji.STATUS["fully_qualified"] and len(e.replace("\ufe0f", "")) == 1]
    drawn = [e for e, rgba in zip(chars, _draw(font, chars)) if rgba is not None]
    return drawn, [_name(data[e]["en"]) for e in drawn], [_name(data[e]["ja"]) for e in drawn]


def _emoji_package():
    try:
        import emoji
    except ImportError:
        raise MinisdError("the emoji dataset needs the `emoji` package: pip install emoji") from None
    if "ja" not in next(iter(emoji.EMOJI_DATA.values())):
        emoji.config.load_language("ja")  # adds data[e]["ja"] to every entry
    return emoji


def _name(short_name: str) -> str:
    """':red_apple:' → 'red apple'."""
    return short_name.strip(":").replace("_", " ")


def _draw(font: str, chars: list[str]) -> list[np.ndarray | None]:
    """Each emoji as uint8 RGBA (BASE, BASE, 4), centred; None where the font has no picture."""
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(font, GLYPH_SIZE)
    out, at = [], GLYPH_SIZE // 4
    for e in chars:
        canvas = Image.new("RGBA", (2 * GLYPH_SIZE, 2 * GLYPH_SIZE))
        ImageDraw.Draw(canvas).text((at, at), e, font=face, embedded_color=True)
        if canvas.getbbox() is None:  # nothing drawn: an emoji newer than the font
            out.append(None)
            continue
        # the glyph's whole cell, not just its ink, so that a "small square" stays smaller than a large one
        left, top, right, bottom = face.getbbox(e)
        glyph = canvas.crop((at + left, at + top, at + right, at + bottom))
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side))
        square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        # resize with premultiplied alpha, so transparent pixels do not bleed their colour
        small = square.convert("RGBa").resize((BASE, BASE), Image.LANCZOS).convert("RGBA")
        out.append(np.asarray(small))
    return out


def emoji_renders(root: str | Path = "data") -> tuple[list[str], list[str], list[str], np.ndarray]:
    """(emoji, English names, Japanese names, uint8 RGBA (K, BASE, BASE, 4)), cached in root/cache/."""
    font = find_font(root)
    chars, en, ja = emoji_table(font)
    digest = hashlib.sha256(font.read_bytes()).hexdigest()[:12]
    cache = Path(root) / "cache" / f"emoji-{digest}-{BASE}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if z["chars"].tolist() == chars:
                return chars, en, ja, z["rgba"]
    rgba = np.stack(_draw(str(font), chars))
    try:
        from minisd.checkpoint import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: savez would add ".npz" to a bare path
                np.savez_compressed(f, chars=np.array(chars), rgba=rgba)

        atomic_write(cache, write)
    except OSError:
        pass  # a read-only data folder: render every time
    return chars, en, ja, rgba


def load_emoji(split: str = "train", lang: str = "en", root: str | Path = "data", image_size: int = 32,
               num_images: int | None = None, seed: int = 0):
    """The emoji dataset as `minisd.data.CaptionedImages`; labels (N,) index `emoji_renders`' emoji.

    split: 'train' and 'test' draw every emoji but `HELD_OUT` (the same emoji, in other sizes and
        places: train puts an emoji's left edge at an even column, test at an odd one, so no
        image is in both), 'heldout' only those.  lang: 'en', 'ja' or 'both' (each image one of the two,
        at random).  num_images: default `DEFAULT_SIZES[split]`; the emoji take turns, in a
        shuffled order each round, so every one appears about equally often.
    """
    from minisd.data import CaptionedImages, _index_texts
    from minisd.errors import check_choice, check_count

    check_choice("split", split, tuple(DEFAULT_SIZES))
    check_choice("language", lang, LANGUAGES)
    check_count("image_size", image_size, 8)
    n = DEFAULT_SIZES[split] if num_images is None else check_count("num_images", num_images, 1)
    chars, en, ja, rgba = emoji_renders(root)
    held = [en.index(name) for name in HELD_OUT]
    pool = held if split == "heldout" else [k for k in range(len(chars)) if k not in held]
    rng = np.random.default_rng([seed, _SPLIT_SEED[split]])
    rounds = -(-n // len(pool))
    which = np.concatenate([rng.permutation(pool) for _ in range(rounds)])[:n]
    images = torch.from_numpy(_compose(rgba, which, image_size, rng, odd_x=split != "train"))
    if lang == "both":
        names = [(en if use_en else ja)[k] for k, use_en in zip(which.tolist(), rng.random(n) < 0.5)]
    else:
        names = [(en if lang == "en" else ja)[k] for k in which.tolist()]
    texts, ids = _index_texts(names)
    name = "emoji" if lang == "en" else f"emoji-{lang}"
    return CaptionedImages(name, split, images, texts, ids, torch.from_numpy(which).long())


def _compose(rgba: np.ndarray, which: np.ndarray, size: int, rng: np.random.Generator,
             odd_x: bool) -> np.ndarray:
    """uint8 (N, 3, size, size): emoji `which[i]` at a random side in `_SCALE` × size and a random
    place, over white; its left edge at an odd column if `odd_x`, else at an even one."""
    from PIL import Image

    out = np.empty((len(which), 3, size, size), dtype=np.uint8)
    sides = np.minimum(np.round(rng.uniform(*_SCALE, len(which)) * size).astype(int), size - 1)
    corners = rng.random((len(which), 2))
    for i, (k, side, (u, v)) in enumerate(zip(which.tolist(), sides.tolist(), corners)):
        glyph = Image.fromarray(rgba[k]).convert("RGBa").resize((side, side), Image.LANCZOS).convert("RGBA")
        canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        room = size - side  # ≥ 1: the corner goes anywhere in 0 … room
        # train puts the left edge at an even column, the other splits at an odd one: no image is in two splits
        x = 2 * int(u * (room // 2 + 1)) if odd_x is False else 1 + 2 * int(u * ((room + 1) // 2))
        canvas.alpha_composite(glyph, (x, int(v * (room + 1))))
        out[i] = np.asarray(canvas.convert("RGB")).transpose(2, 0, 1)
    return out
