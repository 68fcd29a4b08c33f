"""The built-in captioned Shapes dataset, and 2-D toy data for chapter 2.

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
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from minisd.errors import MinisdError, check_choice

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
    """
    if not (0 <= paraphrase <= 1 and 0 <= drop <= 1):
        raise MinisdError(f"paraphrase {paraphrase} and drop {drop} must be probabilities in [0, 1]")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1, 4)
    n = len(labels)
    u = torch.rand(n, 7, generator=generator)  # one uniform draw per decision
    mentioned = torch.rand(n, 4, generator=generator) >= drop
    out = []
    for row, keep, (p_para, p_tpl, *p_syn) in zip(decode_labels(labels), mentioned.tolist(), u.tolist()):
        words = dict(row)
        if p_para < paraphrase:
            for k, (name, value) in enumerate(words.items()):
                options = SYNONYMS.get(value, (value,))
                words[name] = options[int(p_syn[k] * len(options))]
        color, shape, size, position = (words[a] if keep[k] else None for k, a in enumerate(ATTRIBUTES))
        np_ = " ".join(["a"] + [w for w in (size, color) if w] + [shape or "shape"])
        if position is None:
            text = np_ if p_para >= paraphrase or p_tpl < 0.5 else f"there is {np_}"
        elif p_para >= paraphrase:
            text = f"{np_} in the {position}"
        else:
            template = PARAPHRASE_TEMPLATES[int(p_tpl * len(PARAPHRASE_TEMPLATES))]
            text = template.format(np=np_, loc=f"in the {position}")
        out.append(text)
    return out, mentioned


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
