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
import time
import urllib.request
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minisd.errors import MinisdError
from minisd.metrics import JudgeNet

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


@lru_cache(maxsize=1)
def _emoji_table() -> dict[str, tuple[str, str]]:
    """Every fully-qualified one-code-point emoji of the `emoji` package → (English, Japanese) name,
    in the package's order; which of them the font draws, `emoji_renders` finds out."""
    emoji = _emoji_package()
    return {e: (_name(d["en"]), _name(d["ja"])) for e, d in emoji.EMOJI_DATA.items()
            if d["status"] == emoji.STATUS["fully_qualified"] and len(e.replace("\ufe0f", "")) == 1}


@lru_cache(maxsize=4)
def font_digest(font: Path) -> str:
    """The SHA-256 of a font file (it keys the render cache and the judge)."""
    return hashlib.sha256(Path(font).read_bytes()).hexdigest()


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
    """(emoji, English names, Japanese names, uint8 RGBA (K, BASE, BASE, 4)) of every emoji of
    `_emoji_table` that the font draws. Drawn once, then read from root/cache/ (keyed by the font
    and the list of emoji, so a new font or a new `emoji` release draws afresh)."""
    font = find_font(root)
    table = _emoji_table()
    listed = hashlib.sha256("".join(table).encode()).hexdigest()[:8]
    cache = Path(root) / "cache" / f"emoji-{font_digest(font)[:12]}-{listed}-{BASE}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            chars, rgba = z["chars"].tolist(), z["rgba"]
    else:
        drawn = [(e, d) for e, d in zip(table, _draw(str(font), list(table))) if d is not None]
        chars, rgba = [e for e, _ in drawn], np.stack([d for _, d in drawn])
        try:
            from minisd.checkpoint import atomic_write

            def write(tmp):
                with open(tmp, "wb") as f:  # a file object: savez would add ".npz" to a bare path
                    np.savez_compressed(f, chars=np.array(chars), rgba=rgba)

            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, write)
        except OSError:
            pass  # a read-only data folder: draw every time
    return chars, [table[e][0] for e in chars], [table[e][1] for e in chars], rgba


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


# --- the judge: which emoji is this? -----------------------------------------------------------
# Prompt fidelity on emoji is how often a classifier over all the emoji reads a sample as the emoji
# its prompt named; FID compares its features on samples and on real renders. It is trained on
# renders of every emoji — the held-out ones too: it is the measuring instrument, not the model
# under test — at random sizes and places, with blur and noise, so that it reads imperfect
# samples as well.

EMOJI_JUDGE_VERSION = "emoji-judge-v1"  # bump when the architecture or the training changes
# The judge for Debian's font (FONT_SHA256), trained with the default config and stored in float16,
# ships with the package: training it takes about 9 minutes on two CPU cores.
SHIPPED_JUDGE = Path(__file__).parent / "pretrained" / "emoji-judge"


@dataclass(frozen=True)
class EmojiJudgeConfig:
    num_emoji: int = 1377
    image_size: int = 32
    width: int = 32
    feature_dim: int = 256
    steps: int = 2400
    batch_size: int = 256
    lr: float = 3e-3
    per_emoji: int = 40  # training renders of each emoji


class EmojiJudge(JudgeNet):
    """Images (N, 3, S, S), uint8 or floats in [0, 1] → logits over the emoji (N, num_emoji); the
    Shapes judge's conv net with one head. `read` gives each image's k most likely emoji, best
    first (N, k)."""

    config_class = EmojiJudgeConfig

    def __init__(self, config: EmojiJudgeConfig = EmojiJudgeConfig()):
        super().__init__(config)
        self.head = nn.Linear(config.feature_dim, config.num_emoji)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def decide(self, h: torch.Tensor, k: int = 5) -> torch.Tensor:
        return self.head(h).topk(k, dim=1).indices


def train_emoji_judge(root: str | Path = "data", config: EmojiJudgeConfig | None = None, seed: int = 1000,
                      device: str = "auto", progress: bool = True) -> tuple[EmojiJudge, dict]:
    """Train the judge on `config.per_emoji` renders of every emoji (seeds apart from every split's).
    Returns (judge, `emoji_judge_accuracy`)."""
    from minisd.metrics import blur_and_noise
    from minisd.train import TrainConfig, train

    chars, _, _, rgba = emoji_renders(root)
    config = config or EmojiJudgeConfig(num_emoji=len(chars))
    if config.num_emoji != len(chars):
        raise MinisdError(f"the judge is configured for {config.num_emoji} emoji; the font draws {len(chars)}")
    rng = np.random.default_rng([seed, 3])
    which = rng.permutation(np.repeat(np.arange(len(chars)), config.per_emoji))
    half = len(which) // 2  # both column parities, as in the train and the test split
    images = torch.from_numpy(np.concatenate([_compose(rgba, which[:half], config.image_size, rng, odd_x=False),
                                              _compose(rgba, which[half:], config.image_size, rng, odd_x=True)]))

    def loss_fn(model, batch, generator):
        x, y = batch
        return F.cross_entropy(model(blur_and_noise(x.float() / 255, generator).clamp(0, 1)), y)

    torch.manual_seed(seed)
    judge = EmojiJudge(config)
    train(judge, loss_fn, (images, torch.from_numpy(which).long()),
          TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=100, seed=seed,
                      device=device, progress=progress, desc="emoji judge"))
    return judge.eval(), emoji_judge_accuracy(judge, root)


def emoji_judge_accuracy(judge: EmojiJudge, root: str | Path = "data") -> dict[str, float]:
    """Top-1 and top-5 accuracy on clean renders (no blur, no noise) of the test split (two per
    emoji) and of the held-out split, seed 0."""
    out = {}
    for split, n in (("test", 2 * judge.config.num_emoji), ("heldout", DEFAULT_SIZES["heldout"])):
        ds = load_emoji(split, "en", root, judge.config.image_size, n, seed=0)
        top, _ = judge.read(ds.images)
        out[f"{split}/top1"] = (top[:, 0] == ds.labels).float().mean().item()
        out[f"{split}/top5"] = (top == ds.labels[:, None]).any(1).float().mean().item()
    return out


def write_emoji_judge(judge: EmojiJudge, folder: str | Path, root: str | Path = "data") -> dict:
    """Store `judge` in float16 in `folder` (as `SHIPPED_JUDGE` is made), with its accuracy measured
    after the rounding (`emoji_judge_accuracy`) in accuracy.json; returns that accuracy."""
    import json

    from minisd.checkpoint import atomic_write

    folder = Path(folder)
    judge.to(torch.float16).save_pretrained(folder)
    judge = EmojiJudge.from_pretrained(folder)  # float32 again, from the rounded weights
    accuracy = emoji_judge_accuracy(judge, root)
    atomic_write(folder / "accuracy.json", lambda tmp: Path(tmp).write_text(json.dumps(accuracy, indent=2) + "\n"))
    return accuracy


def load_emoji_judge(root: str | Path = "data", config: EmojiJudgeConfig | None = None, device: str = "cpu",
                     progress: bool = True, log=print) -> tuple[EmojiJudge, dict]:
    """The emoji judge and its accuracy: the one shipped with the package for Debian's font and the
    default config; otherwise trained on first use (about 9 minutes on 2 cores for the default)
    and cached in `minisd.metrics.cache_dir()`, one folder per font and config."""
    import json

    from minisd.checkpoint import atomic_write
    from minisd.metrics import cache_dir

    digest = font_digest(find_font(root))
    default = EmojiJudgeConfig(num_emoji=len(emoji_renders(root)[0]))
    config = config or default
    if config == default and digest == FONT_SHA256 and (SHIPPED_JUDGE / "accuracy.json").is_file():
        return (EmojiJudge.from_pretrained(SHIPPED_JUDGE).to(device).eval(),
                json.loads((SHIPPED_JUDGE / "accuracy.json").read_text()))
    key = hashlib.sha256((digest + json.dumps(asdict(config), sort_keys=True)).encode()).hexdigest()[:12]
    folder = cache_dir() / f"{EMOJI_JUDGE_VERSION}-{key}"
    try:
        judge = EmojiJudge.from_pretrained(folder)
        accuracy = json.loads((folder / "accuracy.json").read_text())
    except (MinisdError, OSError, json.JSONDecodeError):
        log(f"training the emoji judge (once; cached in {folder})")
        judge, accuracy = train_emoji_judge(root, config, device=device, progress=progress)
        judge.save_pretrained(folder)
        atomic_write(folder / "accuracy.json", lambda tmp: Path(tmp).write_text(json.dumps(accuracy, indent=2)))
    return judge.to(device).eval(), accuracy


COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white")
OBJECTS = ("heart", "circle", "square")


def colour_and_object(name: str) -> tuple[str | None, str | None]:
    """The colour word and the object word of an English emoji name: 'green heart' → ('green',
    'heart'), 'black large square' → ('black', 'square'), 'red apple' → ('red', None)."""
    words = name.split()
    colour = next((w for w in words if w in COLOURS), None)
    return colour, (words[-1] if words and words[-1] in OBJECTS else None)


def evaluate_emoji(sd, judge: EmojiJudge, root: str | Path = "data", lang: str = "en", per_prompt: int = 1,
                   held_out_per_prompt: int = 20, steps: int = 20, guidance_scale: float = 4.0, seed: int = 0,
                   batch_size: int = 250, limit: int | None = None, progress: bool = False,
                   return_samples: bool = False) -> dict:
    """Prompt fidelity and FID of a text-to-image model trained on emoji, read by the emoji judge.

    Every emoji of the test split is prompted by its name in `lang` ('en' or 'ja') `per_prompt`
    times (the first `limit` emoji only, if given), each held-out emoji `held_out_per_prompt`
    times. Returned, as fractions with their 95 % Wilson intervals ('<key>_ci'):

    top1, top5            the share of samples whose emoji is the judge's first / among its five first
    heldout_top1, heldout_top5   the same on the held-out compositions (green heart, …)
    heldout_colour, heldout_object  held-out samples read as an emoji of the asked colour / object
    fid, fid_reference    Fréchet distance of the judge's features: samples against real renders of
                          the same emoji, and a second real set against the first (the floor)

    FID compares the two sets as distributions: a model that drew every emoji in another's place
    would score as well as a perfect one. Fidelity to the prompt is what top1 and top5 measure.

    With `return_samples`, out['samples'] also holds every sample and its reading, for a closer look:
    images (N, 3, S, S) in [0, 1], asked (N,) the prompted emoji, read (N, 5) the judge's five first,
    held_out (N,) bool (not JSON: drop it before writing the dict to a file).
    """
    from minisd.errors import check_choice
    from minisd.metrics import frechet_distance, proportion_interval

    check_choice("prompt language", lang, ("en", "ja"))
    begin = time.perf_counter()
    chars, en, ja, rgba = emoji_renders(root)
    names = en if lang == "en" else ja
    held = [en.index(name) for name in HELD_OUT]
    test = [k for k in range(len(chars)) if k not in held][:limit]
    asked = torch.tensor([k for k in test for _ in range(per_prompt)] + [k for k in held for _ in range(held_out_per_prompt)])
    prompts = [names[k] for k in asked.tolist()]
    images = []
    for lo in tqdm(range(0, len(prompts), batch_size), desc="sampling emoji", disable=not progress):
        res = sd(prompts[lo: lo + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed + lo)
        images.append(res.images.cpu())
    images = torch.cat(images)
    top, feats = judge.read(images)
    is_held = torch.tensor([k in held for k in asked.tolist()])
    out: dict = {}

    def rate(key, hits):
        out[key], out[f"{key}_ci"] = hits.float().mean().item(), proportion_interval(int(hits.sum()), len(hits))

    hit1, hit5 = top[:, 0] == asked, (top == asked[:, None]).any(1)
    rate("top1", hit1[~is_held]), rate("top5", hit5[~is_held])
    rate("heldout_top1", hit1[is_held]), rate("heldout_top5", hit5[is_held])
    read_names = [en[k] for k in top[is_held, 0].tolist()]
    wanted = [colour_and_object(en[k]) for k in asked[is_held].tolist()]
    rate("heldout_colour", torch.tensor([colour_and_object(r)[0] == w[0] for r, w in zip(read_names, wanted)]))
    rate("heldout_object", torch.tensor([colour_and_object(r)[1] == w[1] for r, w in zip(read_names, wanted)]))
    size = images.shape[-1]
    real = [torch.from_numpy(_compose(rgba, asked[~is_held].numpy(), size, np.random.default_rng([seed, s]), odd_x=True))
            for s in (10_000, 20_000)]
    feats_a, feats_b = (judge.read(r)[1] for r in real)
    out["fid"] = frechet_distance(feats[~is_held], feats_a)
    out["fid_reference"] = frechet_distance(feats_b, feats_a)
    out["num_images"], out["lang"], out["seconds"] = len(images), lang, time.perf_counter() - begin
    if return_samples:
        out["samples"] = {"images": images, "asked": asked, "read": top, "held_out": is_held}
    return out


def format_emoji_metrics(r: dict) -> list[str]:
    """`evaluate_emoji`'s figures as lines, each rate with its 95 % interval."""
    from minisd.metrics import format_interval

    def rate(key):
        return f"{key} {format_interval(r[key], r[key + '_ci'], percent=True)}"

    return [f"prompts in {r['lang']}: {r['num_images']} images in {r['seconds']:.0f} s",
            "  " + "  ".join(rate(k) for k in ("top1", "top5")) + "  (the judge's reading)",
            "  held-out compositions: " + "  ".join(rate(k) for k in ("heldout_top1", "heldout_top5", "heldout_colour",
                                                                     "heldout_object")),
            f"  FID {r['fid']:.1f} against real renders of the same emoji; real vs real {r['fid_reference']:.1f}"]
