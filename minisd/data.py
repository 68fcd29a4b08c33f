"""Captioned image datasets: the built-in Shapes, MNIST, Fashion-MNIST, CIFAR-10 and the user's
own folder of captioned images; and 2-D toy data for chapter 2.

Shapes draws one object on a black background, described by four attributes:

    color     red, green, blue, yellow, purple, white   (canonical RGB values in `COLORS`)
    shape     circle, square, triangle
    size      small, large
    position  top left, top right, bottom left, bottom right, center

and a caption `a {size} {color} {shape} in the {position}`. Everything is generated locally and
is deterministic for a seed, so nothing needs a download. A fixed set of (color, shape) pairs,
`HELD_OUT_PAIRS`, never appears in the `train` or `test` splits; the `heldout` split holds only
those pairs, to test whether a model composes attributes it has only seen apart.

Images are rendered with anti-aliased edges from signed distances, in batches on the CPU:
50,000 images of 32×32 take about a second.

`load_dataset(name)` returns any of `DATASETS`, or a folder of your own images, as one
`CaptionedImages`: uint8 images (N, 3, S, S), the distinct captions `texts`, and each image's
`caption_ids` into them.

    shapes          the Shapes above (splits train, test, heldout)
    mnist           handwritten digits, "a handwritten digit seven"
    fashion-mnist   clothes, "a photo of a sneaker"
    cifar10         small photos, "a photo of a cat", "a photo of an airplane"
    emoji           1,377 emoji of the Noto Color Emoji font, "red apple" (splits train, test,
                    heldout; see `minisd.emojis`); emoji-ja: the Japanese names, "赤リンゴ";
                    emoji-both: each image one of the two
    any other name  the path of a folder of captioned images (one split, train)

MNIST and Fashion-MNIST (28×28 grey) are padded with black to 32×32 and repeated into three
channels; they are read by torchvision from `root/MNIST/raw` and `root/FashionMNIST/raw`.
CIFAR-10 is read from the official python version in `root/cifar-10-batches-py`, with an
unpickler that admits numpy arrays and nothing else, since a pickle can run code. Nothing is
downloaded unless asked (`download=True`, or `minisd data --dataset mnist --download`).

A folder of your own images has its captions in one of two ways; `captions.jsonl` wins if both:

    photos/cat.jpg + photos/cat.txt     each image with a UTF-8 text file of the same name
    photos/captions.jsonl               {"file_name": "cat.jpg", "text": "a photo of a cat"} a line

Only the folder itself is searched for images (.png .jpg .jpeg .webp .bmp), not its subfolders
and not hidden files, in order of file name; `captions.jsonl` may name images in subfolders.
Each image is made RGB (transparency over white), centre-cropped to a square and resized to
`image_size` (bicubic).
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from minisd.distributed import draw_device, rows
from minisd.errors import MinisdError, check_choice, check_count

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

ATTRIBUTES = ("color", "shape", "size", "position")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
}
# (color, shape) pairs never shown in training: each colour and each shape at most once.
HELD_OUT_PAIRS = (("blue", "triangle"), ("yellow", "circle"), ("purple", "square"))
SPLITS = ("train", "test", "heldout")
DEFAULT_SIZES = {"train": 50_000, "test": 5_000, "heldout": 2_000}

# Geometry, as fractions of the image side.
_CENTERS = {  # (x, y), y pointing down
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": 0.12, "large": 0.21}
_JITTER_CENTER = 0.03  # ± this fraction of the side
_JITTER_RADIUS = 0.08  # ± this fraction of the radius


def caption(color: str, shape: str, size: str, position: str) -> str:
    """The canonical caption, e.g. 'a small red circle in the top left'."""
    for name, value in zip(ATTRIBUTES, (color, shape, size, position)):
        check_choice(name, value, VOCABULARY[name])
    return f"a {size} {color} {shape} in the {position}"


def parse_caption(text: str) -> dict[str, str]:
    """Read the four attributes back from a canonical caption.

    >>> parse_caption("a large blue square in the center")
    {'color': 'blue', 'shape': 'square', 'size': 'large', 'position': 'center'}
    """
    words = text.strip().lower().split()
    form = "'a {size} {color} {shape} in the {position}'"
    if len(words) < 7 or words[0] != "a" or words[4:6] != ["in", "the"]:
        raise MinisdError(f"caption {text!r} is not of the form {form}")
    size, color, shape, position = words[1], words[2], words[3], " ".join(words[6:])
    for name, value in zip(ATTRIBUTES, (color, shape, size, position)):
        check_choice(name, value, VOCABULARY[name])
    return {"color": color, "shape": shape, "size": size, "position": position}


def encode_labels(**attributes: str | list[str]) -> torch.Tensor:
    """Attribute names → integer labels of shape (N, 4), columns in `ATTRIBUTES` order.

    Each keyword is one attribute, given as a string or a list of strings of the same length.
    >>> encode_labels(color="red", shape="circle", size="small", position="top left")
    tensor([[0, 0, 0, 0]])
    """
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        check_choice("attribute", sorted(unknown)[0], ATTRIBUTES)
    missing = [a for a in ATTRIBUTES if a not in attributes]
    if missing:
        raise MinisdError(f"missing attribute(s) {missing}; give all of {list(ATTRIBUTES)}")
    columns = []
    for name in ATTRIBUTES:
        values = attributes[name]
        values = [values] if isinstance(values, str) else list(values)
        for v in values:
            check_choice(name, v, VOCABULARY[name])
        columns.append([VOCABULARY[name].index(v) for v in values])
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise MinisdError(f"attribute lists have different lengths {sorted(lengths)}")
    return torch.tensor(columns, dtype=torch.long).T.contiguous()


def decode_labels(labels: torch.Tensor) -> list[dict[str, str]]:
    """Integer labels (N, 4) → a list of attribute dicts."""
    return [
        {name: VOCABULARY[name][int(i)] for name, i in zip(ATTRIBUTES, row)} for row in labels
    ]


def captions_for(labels: torch.Tensor) -> list[str]:
    """Integer labels (N, 4) → canonical captions."""
    return [caption(**d) for d in decode_labels(labels)]


# --- paraphrases: other ways of saying the same thing ----------------------------------------
# A text encoder trained on one fixed sentence per image could get away with a lookup table.
# Paraphrases (other word orders, a few synonyms) and partial captions (some attributes left
# out) make it learn what each word means, and let prompts such as "a red shape" mean something.
SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big"),
                                        "center": ("center", "middle")}
PARAPHRASE_TEMPLATES = (  # {np}: "a small red circle"; {loc}: "in the top left"
    "{np} {loc}",
    "there is {np} {loc}",
    "{loc} : {np}",
    "{loc} there is {np}",
    "{np} , {loc}",
)


def describe(labels: torch.Tensor, generator: torch.Generator | None = None,
             paraphrase: float = 0.5, drop: float = 0.0) -> tuple[list[str], torch.Tensor]:
    """Captions for labels (N, 4), varied at random (seeded by `generator`).

    With probability `paraphrase` a caption uses another word order and synonyms instead of the
    canonical form; each attribute is left out with probability `drop` (a missing shape becomes
    the word "shape"; a missing position drops "in the …"). Returns (captions, mentioned), where
    mentioned (N, 4) bool says which attributes each caption states.

    Training does not call this in its loop: `minisd.captions.ShapesCaptions` makes the same
    choices from the same random numbers, with every possible caption tokenised once.
    """
    if not (0 <= paraphrase <= 1 and 0 <= drop <= 1):
        raise MinisdError(f"paraphrase {paraphrase} and drop {drop} must be probabilities in [0, 1]")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1, 4).cpu()
    u, mentioned = caption_draws(len(labels), generator, drop)
    out = []
    for row, keep, (p_para, p_tpl, *p_syn) in zip(labels.tolist(), mentioned.tolist(), u.tolist()):
        para = p_para < paraphrase
        synonyms = [int(p * len(SYNONYMS.get(VOCABULARY[a][v], (None,)))) for a, v, p in zip(ATTRIBUTES, row, p_syn)]
        out.append(write_caption(row, keep, para, int(p_tpl * len(PARAPHRASE_TEMPLATES)), p_tpl >= 0.5, synonyms))
    return out, mentioned.cpu()


def caption_draws(n: int, generator: torch.Generator | None, drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers behind `describe`, on the generator's device: u (n, 7) uniform — whether
    to paraphrase, the template, one synonym choice per attribute (and one spare) — and mentioned
    (n, 4), which attributes are kept."""
    where = draw_device(generator)
    u = rows(lambda m: torch.rand(m, 7, generator=generator, device=where), n)  # one uniform draw per decision
    mentioned = rows(lambda m: torch.rand(m, 4, generator=generator, device=where), n) >= drop
    return u, mentioned


def write_caption(labels: list[int], keep: list[bool], para: bool, template: int, there_is: bool,
                  synonyms: list[int]) -> str:
    """One caption from its choices: labels (color, shape, size, position) as indices, which
    attributes to keep, whether to paraphrase, and if so the template (an index into
    `PARAPHRASE_TEMPLATES`; without a position, `there_is` says whether to start "there is") and
    each attribute's synonym (an index into its `SYNONYMS`)."""
    words = {}
    for a, v, k in zip(ATTRIBUTES, labels, synonyms):
        value = VOCABULARY[a][v]
        words[a] = SYNONYMS.get(value, (value,))[k] if para else value
    color, shape, size, position = (words[a] if kept else None for a, kept in zip(ATTRIBUTES, keep))
    np_ = " ".join(["a"] + [w for w in (size, color) if w] + [shape or "shape"])
    if position is None:
        return f"there is {np_}" if para and there_is else np_
    if not para:
        return f"{np_} in the {position}"
    return PARAPHRASE_TEMPLATES[template].format(np=np_, loc=f"in the {position}")


def sample_labels(n: int, split: str = "train", generator: np.random.Generator | None = None):
    """Draw `n` attribute labels (N, 4) uniformly over what `split` allows."""
    check_choice("split", split, SPLITS)
    rng = generator if generator is not None else np.random.default_rng(0)
    held = {(VOCABULARY["color"].index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS}
    every_pair = [(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))]
    pairs = [p for p in every_pair if (p in held) == (split == "heldout")]
    pairs = np.array(pairs)[rng.integers(0, len(pairs), n)]
    sizes = rng.integers(0, len(SIZES), n)
    positions = rng.integers(0, len(POSITIONS), n)
    return torch.from_numpy(np.stack([pairs[:, 0], pairs[:, 1], sizes, positions], 1)).long()


def render(
    labels: torch.Tensor,
    image_size: int = 32,
    generator: np.random.Generator | None = None,
    jitter: bool = True,
    chunk: int = 8192,
) -> torch.Tensor:
    """Draw one object per row of `labels` (N, 4). Returns uint8 images (N, 3, S, S).

    Each edge is anti-aliased: a pixel's coverage is clamp(0.5 − d, 0, 1), where d is the signed
    distance in pixels from the pixel centre to the shape's outline (negative inside).
    With `jitter`, the centre and radius vary a little, drawn from `generator`.
    """
    if image_size < 8:
        raise MinisdError(f"image_size {image_size} is too small; use 8 or more")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1, 4)
    n, s = len(labels), image_size
    rng = generator if generator is not None else np.random.default_rng(0)
    centers = torch.tensor([_CENTERS[p] for p in POSITIONS])[labels[:, 3]] * s  # (N, 2)
    radius = torch.tensor([_RADIUS[z] for z in SIZES])[labels[:, 2]] * s  # (N,)
    if jitter:
        centers = centers + torch.from_numpy(rng.uniform(-1, 1, (n, 2))).float() * _JITTER_CENTER * s
        radius = radius * (1 + torch.from_numpy(rng.uniform(-1, 1, n)).float() * _JITTER_RADIUS)
    colors = torch.tensor(list(COLORS.values()), dtype=torch.float32)[labels[:, 0]]  # (N, 3)

    grid = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
    out = torch.empty(n, 3, s, s, dtype=torch.uint8)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        dx = grid.view(1, 1, s) - centers[lo:hi, 0].view(-1, 1, 1)  # (b, 1, S)
        dy = grid.view(1, s, 1) - centers[lo:hi, 1].view(-1, 1, 1)  # (b, S, 1)
        r = radius[lo:hi].view(-1, 1, 1)
        dist = torch.empty(hi - lo, s, s)
        shape = labels[lo:hi, 1]
        for k, name in enumerate(SHAPES):
            m = shape == k
            if m.any():
                dist[m] = _signed_distance(name, dx[m], dy[m], r[m])
        coverage = (0.5 - dist).clamp(0, 1)  # (b, S, S)
        img = coverage.unsqueeze(1) * colors[lo:hi].view(-1, 3, 1, 1)  # (b, 3, S, S)
        out[lo:hi] = (img + 0.5).to(torch.uint8)  # round to nearest
    return out


def _signed_distance(shape: str, dx, dy, r):
    """Signed distance (pixels) from each pixel to a shape of 'radius' r; negative inside."""
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - r
    if shape == "square":  # half-side 0.85 r, so its area is close to the circle's
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # An upward equilateral triangle with circumradius R = 1.3 r: inside all three edges.
    # Each edge has an outward unit normal n and lies at distance R/2 from the centroid. The
    # centroid sits R/4 below the given centre, so the triangle's bounding box is centred there.
    R = 1.3 * r
    dy = dy - R / 4
    normals = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]  # y down
    return torch.stack([nx * dx + ny * dy - R / 2 for nx, ny in normals]).amax(0)


class Shapes(Dataset):
    """The captioned Shapes dataset, rendered in memory.

    Args:
        split: 'train' and 'test' never contain `HELD_OUT_PAIRS`; 'heldout' contains only them.
        num_images: how many; defaults to 50,000 / 5,000 / 2,000 for train / test / heldout.
        image_size: side in pixels.
        seed: the same seed and split always give the same images; splits use separate streams.

    Attributes:
        images: uint8 (N, 3, S, S);  labels: long (N, 4), columns `ATTRIBUTES`;  captions: list[str].

    Each item is a dict: 'image' float (3, S, S) in [0, 1], 'caption' str, 'labels' long (4,).
    """

    def __init__(self, split: str = "train", num_images: int | None = None,
                 image_size: int = 32, seed: int = 0):
        check_choice("split", split, SPLITS)
        num_images = DEFAULT_SIZES[split] if num_images is None else int(num_images)
        if num_images < 1:
            raise MinisdError(f"num_images must be at least 1, got {num_images}")
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
        self.split, self.image_size, self.seed = split, image_size, seed
        self.labels = sample_labels(num_images, split, rng)
        self.images = render(self.labels, image_size, rng)
        self.captions = captions_for(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i].float() / 255,
            "caption": self.captions[i],
            "labels": self.labels[i],
        }

    def __repr__(self) -> str:
        return (f"Shapes(split={self.split!r}, num_images={len(self)}, "
                f"image_size={self.image_size}, seed={self.seed})")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] (or floats in [0, 1]) → floats in [-1, 1], the range diffusion works in."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return x * 2 - 1


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] → floats in [0, 1], clamped, for display."""
    return ((x + 1) / 2).clamp(0, 1)


TOY_DATASETS = ("spiral", "moons", "gaussians")


def toy_2d(name: str = "spiral", n: int = 10_000, seed: int = 0, noise: float = 0.03) -> torch.Tensor:
    """Points (n, 2) from a 2-D distribution, scaled to unit standard deviation overall.

    'spiral': a two-turn spiral; 'moons': two interleaved half circles; 'gaussians': eight small
    Gaussians on a circle. Deterministic for a seed.
    """
    check_choice("toy dataset", name, TOY_DATASETS)
    rng = np.random.default_rng(seed)
    if name == "spiral":
        theta = np.sqrt(rng.uniform(0, 1, n)) * 4 * np.pi
        x = np.stack([theta * np.cos(theta), theta * np.sin(theta)], 1)
    elif name == "moons":
        a = rng.uniform(0, np.pi, n)
        upper = rng.uniform(0, 1, n) < 0.5
        x = np.where(upper[:, None], np.stack([np.cos(a), np.sin(a)], 1),
                     np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1))
    else:
        k = rng.integers(0, 8, n) * (2 * np.pi / 8)
        x = np.stack([np.cos(k), np.sin(k)], 1) * 2
    x = (x - x.mean(0)) / x.std()
    x = x + rng.normal(0, noise, x.shape)
    return torch.from_numpy(x).float()


# --- real datasets and the user's own captioned images ----------------------------------------
EMOJI_DATASETS = {"emoji": "en", "emoji-ja": "ja", "emoji-both": "both"}  # name → caption language
DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10", *EMOJI_DATASETS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"
MNIST_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle boot")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FOLDER = "cifar-10-batches-py"
_FILE_KEYS, _TEXT_KEYS = ("file_name", "file", "image"), ("text", "caption")


@dataclass(eq=False, repr=False)
class CaptionedImages(Dataset):
    """Captioned images from any source `load_dataset` knows.

    Attributes:
        name: one of `DATASETS`, or the folder's path;  split: 'train', 'test' or 'heldout'.
        images: uint8 (N, 3, S, S).
        texts: the distinct captions;  caption_ids: long (N,), each image's index into `texts`.
        labels: Shapes' attribute labels (N, 4); the class index (N,) for mnist, fashion-mnist
            and cifar10; None for a folder.

    Each item is a dict: 'image' float (3, S, S) in [0, 1], 'caption' str, 'caption_id' long (),
    and 'labels' where the dataset has them.
    """

    name: str
    split: str
    images: torch.Tensor
    texts: list[str]
    caption_ids: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3 \
                or self.images.shape[2] != self.images.shape[3]:
            raise MinisdError(f"images must be uint8 (N, 3, S, S), got {self.images.dtype} "
                              f"{tuple(self.images.shape)}")
        if self.caption_ids.shape != (n,) or self.caption_ids.dtype != torch.long:
            raise MinisdError(f"caption_ids must be long ({n},), got {self.caption_ids.dtype} "
                              f"{tuple(self.caption_ids.shape)}")
        if n and not 0 <= int(self.caption_ids.min()) <= int(self.caption_ids.max()) < len(self.texts):
            raise MinisdError(f"caption_ids must index the {len(self.texts)} texts")
        if self.labels is not None and len(self.labels) != n:
            raise MinisdError(f"labels has {len(self.labels)} rows for {n} images")

    @property
    def captions(self) -> list[str]:
        """Each image's caption."""
        return [self.texts[i] for i in self.caption_ids.tolist()]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i].float() / 255,
                "caption": self.texts[int(self.caption_ids[i])],
                "caption_id": self.caption_ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def __repr__(self) -> str:
        return (f"CaptionedImages(name={self.name!r}, split={self.split!r}, num_images={len(self)}, "
                f"image_size={self.image_size}, texts={len(self.texts)})")


def load_dataset(name: str, split: str = "train", root: str | Path = "data", image_size: int = 32,
                 num_images: int | None = None, seed: int = 0,
                 download: bool = False) -> CaptionedImages:
    """One of `DATASETS`, or the folder of captioned images at the path `name`.

    Args:
        split: 'train' or 'test'; shapes and emoji also have 'heldout'; a folder has only 'train'.
        root: where mnist, fashion-mnist and cifar10 are kept (and downloaded to); for emoji, where
            the font may be (else the system's) and where its renders are cached.
        image_size: side in pixels; images other than Shapes are resized to it (bicubic).
        num_images: keep the first this many, in the files' order (all if None or fewer exist).
            Shapes renders exactly this many (its default sizes if None).
        seed: Shapes' and emoji's seed; the other datasets are files, read in order.
        download: fetch mnist, fashion-mnist or cifar10 into `root` first (needs internet); for
            emoji, the font, unless one is installed. Shapes is generated: nothing to fetch.
    """
    check_count("image_size", image_size, 8)
    if num_images is not None:
        check_count("num_images", num_images, 1)
    if name == "shapes":
        ds = Shapes(split, num_images, image_size, seed)
        texts, ids = _index_texts(ds.captions)
        return CaptionedImages("shapes", split, ds.images, texts, ids, ds.labels)
    if name in EMOJI_DATASETS:
        from minisd.emojis import download_font, find_font, load_emoji

        if download:
            try:
                find_font(root)
            except MinisdError:
                download_font(root)
        return load_emoji(split, EMOJI_DATASETS[name], root, image_size, num_images, seed)
    if name not in DATASETS:
        return _load_folder(Path(name), split, image_size, num_images, download)
    if split not in ("train", "test"):
        raise MinisdError(f"unknown split {split!r} for {name}; allowed: 'train', 'test' "
                          "('heldout' exists only for shapes and emoji)")
    if name == "cifar10":
        images, labels, classes = _read_cifar10(Path(root), split, download, num_images)
        texts = [f"a photo of {_article(c)} {c}" for c in classes]
    else:
        images, labels = _read_mnist(name, Path(root), split, download)
        # 28×28 → 32×32 with a black border, the side the models are built for: (N, 1, 32, 32)
        images = torch.nn.functional.pad(images[:num_images], (2, 2, 2, 2)).unsqueeze(1)
        if name == "mnist":
            texts = [f"a handwritten digit {c}" for c in MNIST_CLASSES]
        else:
            texts = [f"a photo of {_article(c)} {c}" for c in FASHION_MNIST_CLASSES]
    images, labels = _resize(images[:num_images], image_size), labels[:num_images].clone()
    images = images.expand(-1, 3, -1, -1).contiguous()  # grey → RGB (RGB stays): (N, 3, S, S)
    return CaptionedImages(name, split, images, texts, labels.clone(), labels)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _index_texts(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """Per-image captions → (distinct texts in order of first use, long ids (N,) into them)."""
    texts = list(dict.fromkeys(captions))
    index = {t: i for i, t in enumerate(texts)}
    return texts, torch.tensor([index[c] for c in captions], dtype=torch.long)


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 (N, C, H, W) → uint8 (N, C, size, size), bicubic with antialiasing (as PIL does)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for lo in range(0, len(images), chunk):
        x = images[lo:lo + chunk].float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
        out[lo:lo + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " …"


def _download_hint(name: str, root: Path) -> str:
    root_opt = "" if str(root) == "data" else f" --root {root}"
    return f"download it with `minisd data --dataset {name}{root_opt} --download` (needs internet)"


def _read_mnist(name: str, root: Path, split: str, download: bool):
    """MNIST or Fashion-MNIST through torchvision: uint8 images (N, 28, 28), long labels (N,).

    torchvision (0.29) reads the four raw idx files from root/MNIST/raw (root/FashionMNIST/raw)
    once they exist, without checksums; only its download verifies MD5 sums.
    """
    import torchvision.datasets

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    title = "MNIST" if name == "mnist" else "Fashion-MNIST"
    raw = root / cls.__name__ / "raw"
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except Exception as e:  # torchvision's errors → one line that says what to do
        missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
        files = f"the four raw files ({', '.join(MNIST_FILES)}, uncompressed) there"
        if missing and download:
            raise MinisdError(f"could not download {title} into {str(raw)!r} ({_one_line(e)}); "
                              f"check the internet connection, or copy {files}") from None
        if missing:
            raise MinisdError(f"{title} not found in {str(raw)!r}; {_download_hint(name, root)}, "
                              f"or copy {files}") from None
        raise MinisdError(f"cannot read {title} from {str(raw)!r}: the raw files are not valid "
                          f"idx files ({_one_line(e)}); delete them and download again") from None
    images, labels = ds.data, ds.targets
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28) or len(labels) != len(images) \
            or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9):
        raise MinisdError(f"{title} in {str(raw)!r} is not 28×28 images with labels 0 … 9: "
                          f"images {tuple(images.shape)}, {len(labels)} labels")
    return images, labels.long()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's official batches and nothing else.

    Unpickling may call any importable function the file names, so a doctored file could run
    code (torchvision's CIFAR10 checks MD5 sums first; we read files that may come from
    anywhere). The official files name only numpy's array reconstruction; anything else is
    refused before it is imported.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # Python 2 strings → bytes, as the files were written
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED))
            raise MinisdError(f"refusing to unpickle {str(self.path)!r}: it asks for {module}.{name}, "
                              f"which no CIFAR-10 batch needs, and loading it could run code; "
                              f"allowed: {allowed}")
        if name == "_reconstruct":
            try:  # numpy ≥ 2 moved numpy.core to numpy._core
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # pragma: no cover - numpy 1
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def _unpickle_cifar(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, path).load()
    except MinisdError:
        raise
    except Exception as e:  # truncated, not a pickle, …
        raise MinisdError(f"{str(path)!r} is not a CIFAR-10 batch ({_one_line(e)}); "
                          "delete the folder and download again") from None
    if not isinstance(entry, dict):
        raise MinisdError(f"{str(path)!r} is not a CIFAR-10 batch: it holds a {type(entry).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_field(entry: dict, key: str, path: Path):
    if key not in entry:
        raise MinisdError(f"{str(path)!r} is not a CIFAR-10 batch: it has no {key!r} "
                          f"(it has {sorted(map(str, entry))})")
    return entry[key]


def _read_cifar10(root: Path, split: str, download: bool, num_images: int | None):
    """CIFAR-10's python version: uint8 images (N, 3, 32, 32), long labels (N,), class names.

    Reading stops after the batch that completes `num_images`.
    """
    folder = root / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if download and not (folder / names[0]).is_file():
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        try:  # torchvision's source and MD5 sum; unpacked here, then read with the restricted unpickler below
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as e:
            raise MinisdError(f"could not download CIFAR-10 into {str(folder)!r} ({_one_line(e)}); "
                              "check the internet connection") from None
    missing = [n for n in ["batches.meta", *names] if not (folder / n).is_file()]
    if missing:
        raise MinisdError(f"CIFAR-10 not found in {str(folder)!r} (missing {', '.join(missing)}); "
                          f"{_download_hint('cifar10', root)}, or unpack the python version "
                          f"(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) "
                          f"into {str(root)!r}")
    meta_path = folder / "batches.meta"
    classes = _cifar_field(_unpickle_cifar(meta_path), "label_names", meta_path)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes]
    data, labels = [], []
    for n in names:
        path = folder / n
        entry = _unpickle_cifar(path)
        x, y = _cifar_field(entry, "data", path), _cifar_field(entry, "labels", path)
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 \
                or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
            shape = getattr(x, "shape", None)
            raise MinisdError(f"{str(path)!r} is not a CIFAR-10 batch: 'data' must be uint8 (N, 3072) "
                              f"with N labels, got {type(x).__name__} {shape} and {len(y)} labels")
        data.append(x)
        labels += list(y)
        if num_images is not None and len(labels) >= num_images:
            break
    labels = torch.tensor(labels, dtype=torch.long)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise MinisdError(f"CIFAR-10 labels in {str(folder)!r} go beyond the {len(classes)} label_names")
    # Each row holds the red, then green, then blue plane, each 32×32 row by row.
    images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))  # (N, 3, 32, 32)
    return images, labels, classes


def _load_folder(folder: Path, split: str, image_size: int, num_images: int | None,
                 download: bool) -> CaptionedImages:
    if not folder.exists():
        known = ", ".join(repr(d) for d in DATASETS)
        raise MinisdError(f"unknown dataset {str(folder)!r}; allowed: {known}, or the path of a "
                          f"folder of captioned images (there is no folder {str(folder.absolute())!r})")
    if not folder.is_dir():
        raise MinisdError(f"{str(folder)!r} is not a folder; give one of {', '.join(DATASETS)}, "
                          "or a folder of images with captions")
    if split != "train":
        raise MinisdError(f"a folder of images has one split, 'train' (all its images), not {split!r}; "
                          "to hold images out, put them in a second folder and load that")
    if download:
        raise MinisdError(f"there is nothing to download for the folder {str(folder)!r}; "
                          f"download works for {', '.join(DATASETS[1:5])}")
    jsonl = folder / CAPTIONS_FILE
    entries = _read_captions_jsonl(jsonl) if jsonl.is_file() else _read_caption_files(folder)
    if not entries:
        raise MinisdError(f"no images in {str(folder)!r}: put image files ({' '.join(IMAGE_SUFFIXES)}) "
                          f"there, each with a caption in a .txt file of the same name, or list them "
                          f"in {CAPTIONS_FILE}")
    entries = entries[:num_images]
    images = torch.stack([_read_image(path, image_size) for path, _ in entries])  # (N, 3, S, S)
    texts, ids = _index_texts([text for _, text in entries])
    return CaptionedImages(str(folder), "train", images, texts, ids)


def _read_caption_files(folder: Path) -> list[tuple[Path, str]]:
    """Layout 1: each image beside a .txt caption of the same name. Returns [(image, caption)]."""
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)
    entries = []
    for path in images:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise MinisdError(f"image {str(path)!r} has no caption; write it into {str(txt)!r}, "
                              f"or list every image with its caption in {str(folder / CAPTIONS_FILE)!r}")
        try:
            text = txt.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise MinisdError(f"caption file {str(txt)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text:
            raise MinisdError(f"caption file {str(txt)!r} is empty; write the image's caption in it")
        entries.append((path, text))
    return entries


def _read_captions_jsonl(jsonl: Path) -> list[tuple[Path, str]]:
    """Layout 2: one JSON object a line, {"file_name": "cat.jpg", "text": "…"}. Returns [(image, caption)]."""
    where = str(jsonl)
    try:
        lines = jsonl.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise MinisdError(f"{where!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MinisdError(f"{where!r} line {number} is not JSON ({e.msg}); write one object a line, "
                              '{"file_name": "cat.jpg", "text": "a photo of a cat"}') from None
        if not isinstance(record, dict):
            raise MinisdError(f"{where!r} line {number} is a JSON {type(record).__name__}, not an object "
                              'like {"file_name": "cat.jpg", "text": "a photo of a cat"}')
        file = next((record[k] for k in _FILE_KEYS if k in record), None)
        text = next((record[k] for k in _TEXT_KEYS if k in record), None)
        if not isinstance(file, str) or not file.strip():
            raise MinisdError(f"{where!r} line {number} names no image; give its path, relative to the "
                              f"folder, under one of {', '.join(map(repr, _FILE_KEYS))}")
        if not isinstance(text, str) or not text.strip():
            raise MinisdError(f"{where!r} line {number} has no caption; give it as a non-empty string "
                              f"under one of {', '.join(map(repr, _TEXT_KEYS))}")
        path = jsonl.parent / file
        if Path(file).is_absolute():
            raise MinisdError(f"{where!r} line {number} names {file!r}; give the path relative to the folder")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise MinisdError(f"{where!r} line {number} names {file!r}; allowed image types: "
                              f"{' '.join(IMAGE_SUFFIXES)}")
        if not path.is_file():
            raise MinisdError(f"{where!r} line {number} names {file!r}, which does not exist in "
                              f"{str(jsonl.parent)!r}")
        entries.append((path, text.strip()))
    return entries


def _read_image(path: Path, size: int) -> torch.Tensor:
    """An image file → uint8 (3, size, size): RGB, centre-cropped to a square, resized (bicubic)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # phones store the rotation separately
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            # crop first: resize(box=…) would let the filter reach pixels outside the square
            im = im.crop((left, top, left + side, top + side))
            im = im.resize((size, size), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MinisdError(f"cannot read image {str(path)!r} ({_one_line(e)}); allowed: image files "
                          f"{' '.join(IMAGE_SUFFIXES)} that open in an image viewer") from None
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()  # (3, S, S)
