"""How close generated samples are to the data.

For point clouds (chapter 2): the maximum mean discrepancy with a Gaussian kernel, and the mean
distance from each sample to its nearest data point. Both are 0 when the two sets coincide.
For Shapes images: a rough count of blobs and their colours (`blob_stats`, chapter 2), a geometric
reader (`read_attributes`) and a trained judge (chapter 7's prompt accuracy and FID,
`evaluate_pipeline`). For any of them: `bootstrap_interval`, how far a figure could move with
another draw of the same number of samples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Squared maximum mean discrepancy (Gretton et al. 2012), biased estimate, between samples
    x (N, D) and y (M, D), with a sum of Gaussian kernels k(a, b) = exp(−‖a − b‖² / (2h²)):

        MMD² = mean k(x, x') + mean k(y, y') − 2 · mean k(x, y)
    """
    def k(a, b):
        d2 = torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item()


def mean_nn_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Mean Euclidean distance from each sample (N, D) to its nearest point in `data` (M, D)."""
    return torch.cdist(samples.float(), data.float(), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.mean().item()


# --- reading Shapes images back ---------------------------------------------------------------
# A measuring judge, not a learned one: it reads colour, shape, size and position off an image by
# simple geometry, so chapters 2–4 can say how often a sample matches what was asked for.

# area / r² of each shape as `render` draws it: π, (1.7)², (3√3/4)·1.3²
_AREA_PER_R2 = (math.pi, 1.7**2, 3 * math.sqrt(3) / 4 * 1.3**2)


def nearest_colour(rgb: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3) in [0, 1] → index (N,) of the nearest canonical colour in `minisd.data.COLORS`."""
    from minisd.data import COLORS

    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # (6, 3)
    return torch.cdist(rgb.float(), palette).argmin(1)


def read_attributes(images: torch.Tensor) -> torch.Tensor:
    """Measure the four Shapes attributes of each image (N, 3, S, S), floats in [0, 1] or uint8.
    Returns labels (N, 4) in `minisd.data.ATTRIBUTES` order; −1 where no object is found.

    colour:   the canonical colour nearest to the mean of the object's brightest pixels
    shape:    which of a circle, a square and a triangle of the same area and centroid, drawn
              as `render` draws them, differs least from the object
    size:     the object's area against the midpoint of the small and large areas
    position: the canonical centre nearest to the object's centroid
    """
    from minisd.data import _CENTERS, POSITIONS, SHAPES, _signed_distance

    x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    N, _, S, _ = x.shape
    centers = torch.tensor([_CENTERS[p] for p in POSITIONS])  # (5, 2) as fractions
    brightness = x.amax(1)  # (N, S, S)
    out = torch.full((N, 4), -1, dtype=torch.long)
    grid = torch.arange(S, dtype=torch.float32) + 0.5
    for i in range(N):
        coverage = _coverage(brightness[i])
        if coverage is None:
            continue
        core = coverage > 0.7
        mean_rgb = x[i][:, core].mean(1)  # (3,)
        out[i, 0] = nearest_colour(mean_rgb[None])[0]
        area = coverage.sum()
        cy = (coverage.sum(1) * grid).sum() / area
        cx = (coverage.sum(0) * grid).sum() / area
        errors = []
        for name, k in zip(SHAPES, _AREA_PER_R2):
            r = (area / k).sqrt()
            shift = 1.3 * r / 4 if name == "triangle" else 0.0  # render centres the triangle's box
            template = (0.5 - _signed_distance(name, grid.view(1, S) - cx, grid.view(S, 1) - (cy - shift), r)).clamp(0, 1)
            errors.append((template - coverage).abs().sum())
        out[i, 1] = int(torch.stack(errors).argmin())
        out[i, 2] = int(area > 75 * (S / 32) ** 2)
        out[i, 3] = torch.cdist(torch.stack([cx, cy])[None] / S, centers).argmin()
    return out


def _coverage(brightness: torch.Tensor) -> torch.Tensor | None:
    """How much of each pixel (S, S) the object covers, 0…1, read off the brightest channel
    relative to the brightest pixel; None for an image with no object (nothing above 0.3)."""
    peak = brightness.max()
    if peak < 0.3:
        return None
    return (brightness / peak).clamp(0, 1) * (brightness > 0.15)


def box_fill(images: torch.Tensor) -> torch.Tensor:
    """How much of its bounding box each image's object fills (N,), NaN where there is none: the
    object's area (its coverage summed, as `read_attributes` measures it) over the area of the
    rows and columns where it covers more than half a pixel. A rendered square fills about 1, a
    circle π/4, a triangle 1/2; a square with pinched, concave sides fills less than 1."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    out = torch.full((len(x),), float("nan"))
    for i, brightness in enumerate(x.amax(1)):
        coverage = _coverage(brightness)
        if coverage is None:
            continue
        solid = coverage > 0.5
        height, width = solid.any(1).sum(), solid.any(0).sum()
        if height * width > 0:
            out[i] = coverage.sum() / (height * width)
    return out


def count_regions(mask: torch.Tensor, min_area: int = 1) -> torch.Tensor:
    """Number of connected regions (8-neighbours) of True pixels in each mask (N, H, W) → long (N,),
    counting only regions of at least `min_area` pixels.
    Every True pixel starts with its own label; each round, a pixel takes the largest label among itself
    and its neighbours (a 3 × 3 max-pool), until nothing changes: each region then carries its largest
    starting label, and its size is the number of pixels that carry it."""
    from minisd.errors import MinisdError, check_count

    if mask.ndim != 3 or mask.dtype != torch.bool:
        raise MinisdError(f"count_regions needs bool masks (N, H, W), got {mask.dtype} {tuple(mask.shape)}")
    check_count("min_area", min_area)
    N, H, W = mask.shape
    m = mask.float().unsqueeze(1)  # (N, 1, H, W)
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W) * m  # 0 = background
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    final = labels.flatten(1).long()  # (N, HW): each pixel's region label
    sizes = torch.zeros(N, H * W + 1, dtype=torch.long).scatter_add_(1, final, torch.ones_like(final))  # (N, HW + 1)
    return (sizes[:, 1:] >= min_area).sum(1)  # label 0, the background, left out


def blob_stats(images: torch.Tensor, threshold: float = 0.3, min_area: int = 4,
               one_colour_share: float = 0.9) -> dict[str, torch.Tensor]:
    """A rough reading of images (N, 3, S, S), uint8 or floats in [0, 1], that needs no object to be
    well formed (unlike `read_attributes`): how many blobs, of how many colours. Every Shapes image
    is one blob of one canonical colour. Returns per-image tensors (N,):

    foreground    the fraction of pixels whose brightest channel is above `threshold`
    blobs         connected regions (8-neighbours) of foreground pixels with at least `min_area`
                  pixels (`count_regions`), so that single stray pixels do not count
    colour        the majority colour (an index into `minisd.data.COLORS`, −1 with no foreground):
                  each foreground pixel gets the canonical colour nearest in *hue* — the pixel and the
                  palette both divided by their brightest channel — so that the dim anti-aliased edge
                  of a red shape still counts as red
    colour_share  the share of foreground pixels that get the majority colour (0 with no foreground)
    one_blob      blobs == 1 (bool)
    one_colour    colour_share ≥ `one_colour_share` (bool)
    """
    from minisd.data import COLORS
    from minisd.errors import MinisdError

    if images.ndim != 4 or images.shape[1] != 3:
        raise MinisdError(f"blob_stats needs RGB images (N, 3, S, S), got {tuple(images.shape)}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # (6, 3)
    hues = palette / palette.amax(1, keepdim=True)  # (6, 3), brightness divided out
    brightest = x.amax(1)  # (N, S, S)
    hue = x / brightest.unsqueeze(1).clamp(min=1e-6)  # (N, 3, S, S)
    nearest = torch.cdist(hue.permute(0, 2, 3, 1).reshape(-1, 3), hues).argmin(1).view(brightest.shape)  # (N, S, S)
    fg = brightest > threshold  # (N, S, S)
    counts = torch.stack([torch.bincount(nearest[i][fg[i]], minlength=len(hues)) for i in range(len(x))])  # (N, 6)
    share = counts.amax(1) / counts.sum(1).clamp(min=1)
    colour = torch.where(counts.sum(1) > 0, counts.argmax(1), -1)
    blobs = count_regions(fg, min_area)
    return {"foreground": fg.float().mean((1, 2)), "blobs": blobs, "colour": colour, "colour_share": share,
            "one_blob": blobs == 1, "one_colour": share >= one_colour_share}


def attribute_accuracy(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The fraction of images whose measured colour, shape, size and position match `labels`
    (N, 4), each alone and all four together."""
    from minisd.data import ATTRIBUTES

    read = read_attributes(images)
    match = read == labels.to(read.device)
    acc = {name: match[:, k].float().mean().item() for k, name in enumerate(ATTRIBUTES)}
    acc["all"] = match.all(1).float().mean().item()
    return acc


# --- the judge: a classifier that reads generated images ---------------------------------------
# Chapter 7 measures a text-to-image model by asking a separately trained classifier what it
# sees: prompt accuracy is how often it reads back the colour, shape, size and position that the
# prompt asked for, and the Fréchet distance between its features on generated and on real
# images (FID, Heusel et al. 2017, with this judge in place of Inception) says how real they look.

JUDGE_VERSION = "judge-v1"  # bump when the judge's architecture or training changes (a new cache)


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = 32
    width: int = 32
    feature_dim: int = 128
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    num_images: int = 24_000


def blur_and_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A judge's training augmentation: a 3×3 box blur on half the images, and Gaussian noise of a
    random level up to 0.05 on all; images (N, 3, S, S) in [0, 1]. Draws on `generator`'s device."""
    from minisd.distributed import draw_device

    where = draw_device(generator)
    blur = torch.rand(len(x), 1, 1, 1, generator=generator, device=where).to(x.device) < 0.5
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)
    return x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=generator, device=where).to(x.device) \
        * torch.randn(x.shape, generator=generator, device=where).to(x.device)


class JudgeNet(nn.Module):
    """What the judges share: a plain conv net (three stride-2 stages to S/8, the flattened map
    keeping where things are) from images to `config.feature_dim` features — what FID compares —
    read in batches, and saved as a component. A subclass adds its heads and says, in `decide`,
    what a batch of features is read as; `config_class` is its config's dataclass."""

    config_class: type

    def __init__(self, config):
        super().__init__()
        self.config = c = config

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1), nn.GroupNorm(8, o), nn.SiLU()]

        w = c.width
        self.body = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                  *block(4 * w, 4 * w, 2), nn.Flatten(),
                                  nn.Linear(4 * w * (c.image_size // 8) ** 2, c.feature_dim), nn.SiLU())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) from images (N, 3, S, S), uint8 or floats in [0, 1]. Images of another
        size (the `gpu` preset's 64×64) are first averaged down to the judge's size, as a render at
        that size would look."""
        from minisd.data import normalize

        x = normalize(images)
        if x.shape[-1] != self.config.image_size:
            x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="area")
        return self.body(x)

    def decide(self, h: torch.Tensor, **options) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 1000, **options) -> tuple[torch.Tensor, torch.Tensor]:
        """(what each image is read as, by `decide`; features (N, feature_dim))."""
        device = next(self.parameters()).device
        reads, feats = [], []
        for lo in range(0, len(images), batch_size):
            h = self.features(images[lo: lo + batch_size].to(device))
            feats.append(h.cpu())
            reads.append(self.decide(h, **options).cpu())
        return torch.cat(reads), torch.cat(feats)

    def save_pretrained(self, folder) -> None:
        from minisd.checkpoint import save_module

        save_module(self, asdict(self.config), folder)

    @classmethod
    def from_pretrained(cls, folder):
        from minisd.checkpoint import load_module

        return load_module(cls, cls.config_class, folder)


class Judge(JudgeNet):
    """Shapes images (N, 3, S, S) in [0, 1] → one set of logits per attribute; `read` gives the
    labels (N, 4) as read."""

    config_class = JudgeConfig

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__(config)
        from minisd.data import VOCABULARY

        self.heads = nn.ModuleList(nn.Linear(config.feature_dim, len(v)) for v in VOCABULARY.values())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = self.features(images)
        return [head(h) for head in self.heads]

    def decide(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(h).argmax(1) for head in self.heads], 1)  # (N, 4)


def train_judge(config: JudgeConfig = JudgeConfig(), seed: int = 1000, device: str = "auto",
                progress: bool = True) -> tuple[Judge, dict]:
    """Train the judge on rendered Shapes of every (colour, shape) pair — the held-out pairs too:
    it is the measuring instrument, not the model under test — with a little noise and blur so it
    reads imperfect samples as well. Seeds differ from every evaluation set. Returns (judge,
    accuracy per attribute on 2,000 test and 1,000 held-out images)."""
    from minisd.data import Shapes
    from minisd.train import TrainConfig, train

    n_held = config.num_images // 6
    data = [Shapes("train", config.num_images - n_held, config.image_size, seed),
            Shapes("heldout", n_held, config.image_size, seed)]
    images = torch.cat([d.images for d in data])
    labels = torch.cat([d.labels for d in data])

    def loss_fn(model, batch, generator):
        x, y = batch
        x = blur_and_noise(x.float() / 255, generator)
        return sum(F.cross_entropy(logits, y[:, k]) for k, logits in enumerate(model(x)))

    torch.manual_seed(seed)
    judge = Judge(config)
    train(judge, loss_fn, (images, labels), TrainConfig(steps=config.steps, batch_size=config.batch_size,
                                                        lr=config.lr, warmup_steps=50, seed=seed, device=device,
                                                        progress=progress, desc="judge"))
    return judge, judge_accuracy(judge)


def judge_accuracy(judge: Judge) -> dict[str, float]:
    """The judge's accuracy per attribute on real test and held-out images (seed 0)."""
    from minisd.data import ATTRIBUTES, Shapes

    out = {}
    for split, n in (("test", 2000), ("heldout", 1000)):
        ds = Shapes(split, n, judge.config.image_size, seed=0)
        read, _ = judge.read(ds.images)
        for k, name in enumerate(ATTRIBUTES):
            out[f"{split}/{name}"] = (read[:, k] == ds.labels[:, k]).float().mean().item()
    return out


def cache_dir() -> Path:
    """Where trained helpers (the judge) are kept: $MINISD_CACHE, else ~/.cache/minisd."""
    return Path(os.environ.get("MINISD_CACHE") or Path.home() / ".cache" / "minisd")


def load_judge(config: JudgeConfig = JudgeConfig(), device: str = "cpu", progress: bool = True,
               log=print) -> tuple[Judge, dict]:
    """The judge and its accuracy (`judge_accuracy`), trained on first use (about a minute on 2
    cores for the default config) and cached in `cache_dir()`, one folder per config."""
    from minisd.checkpoint import atomic_write
    from minisd.errors import MinisdError

    name = JUDGE_VERSION if config == JudgeConfig() else \
        JUDGE_VERSION + "-" + hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / name
    try:
        judge = Judge.from_pretrained(folder)
        accuracy = json.loads((folder / "accuracy.json").read_text())
    except (MinisdError, OSError, json.JSONDecodeError):
        log(f"training the judge (once; cached in {folder})")
        judge, accuracy = train_judge(config, device=device, progress=progress)
        judge.save_pretrained(folder)
        atomic_write(folder / "accuracy.json", lambda tmp: Path(tmp).write_text(json.dumps(accuracy, indent=2)))
    return judge.to(device).eval(), accuracy


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D):

        ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)

    with tr (Σ_a Σ_b)^½ = Σ_i sqrt(λ_i), λ the eigenvalues of Σ_a^½ Σ_b Σ_a^½ (symmetric, ≥ 0).
    In float64; covariances with N − 1, as in pytorch-fid."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    lam = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0)
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * lam.sqrt().sum()).item()


def prompt_labels(split: str = "test") -> torch.Tensor:
    """The fixed prompt set: every (colour, shape, size, position) the split allows, in order —
    150 for 'test' (and 'train'), 30 for 'heldout'. Labels (P, 4); captions via `captions_for`."""
    from minisd.data import HELD_OUT_PAIRS, SPLITS, VOCABULARY
    from minisd.errors import check_choice

    check_choice("split", split, SPLITS)
    held = {(VOCABULARY["color"].index(c), VOCABULARY["shape"].index(s)) for c, s in HELD_OUT_PAIRS}
    combos = itertools.product(*(range(len(v)) for v in VOCABULARY.values()))
    return torch.tensor([c for c in combos if ((c[0], c[1]) in held) == (split == "heldout")])


def evaluate_pipeline(sd, judge: Judge, split: str = "test", sampler: str = "ddim", steps: int = 20,
                      guidance_scale: float = 4.0, per_prompt: int | None = None, seed: int = 0,
                      batch_size: int = 300, progress: bool = False, reps: int = 200) -> dict:
    """Prompt accuracy, FID and diversity of a text-to-image model on the fixed prompt set of
    `split`, each with a 95 % bootstrap interval, and how far the judge's readings of the samples
    agree with the geometric reader's.

    Every prompt is sampled `per_prompt` times (default: 4 for test, 10 for held-out: 600 and 300
    images). Returned, as fractions, floats and (lo, hi) pairs:

    color … position, all  the share of samples the judge reads as asked (each attribute, all four);
                           '<name>_ci' its Wilson interval (`proportion_interval`)
    fid                    Fréchet distance between the judge's features of the samples and of a
                           matched real set: one real image rendered for each sample's prompt
    fid_reference          the same between a second matched real set and the first: what a model
                           that draws exactly like the data gets at this sample count
    fid_excess             fid − fid_reference, paired (the two share the first real set)
    '<fid…>_ci'            intervals from `reps` resamplings of every set within each prompt (of
                           the whole set with per_prompt=1), shifted by the bootstrap's bias
                           (`bootstrap_interval(correct_bias=True)`)
    diversity              the mean pairwise feature distance between samples of one prompt,
                           divided by the same for the matched real images (NaN for per_prompt=1)
    geometric_all          the share the geometric reader (`read_attributes`) reads as asked
    agreement_<name>, agreement_all  how often judge and geometric reader read the same value

    The judge is trained to ignore blur and noise, so judge-feature FID sees the wrong colour,
    shape, size or place, and hue drift, but not blurred edges, speckle or a slightly bent
    outline; the geometric reader is the check that does not share the judge's blind spots.
    """
    from minisd.data import ATTRIBUTES, captions_for, render
    from minisd.errors import check_count

    begin = time.perf_counter()
    prompts = prompt_labels(split)
    if per_prompt is None:
        per_prompt = 10 if split == "heldout" else 4
    check_count("per_prompt", per_prompt)
    labels = prompts.repeat_interleave(per_prompt, 0)
    groups = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    captions = captions_for(labels)
    images = []
    for lo in tqdm(range(0, len(captions), batch_size), desc=f"sampling {split}", disable=not progress):
        res = sd(captions[lo: lo + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                 sampler=sampler, seed=seed + lo)
        images.append(res.images.cpu())
    images = torch.cat(images)
    read, feats = judge.read(images)
    out: dict = {}
    match = (read == labels).float()
    for k, name in enumerate((*ATTRIBUTES, "all")):
        hit = match[:, k] if k < len(ATTRIBUTES) else match.amin(1)
        out[name] = hit.mean().item()
        out[f"{name}_ci"] = proportion_interval(int(hit.sum()), len(hit))
    # Two matched real sets: the same labels as the samples, independent draws of jitter.
    real_a = render(labels, sd.image_size, np.random.default_rng(10_000 + seed)).float() / 255
    real_b = render(labels, sd.image_size, np.random.default_rng(20_000 + seed)).float() / 255
    _, feats_a = judge.read(real_a)
    _, feats_b = judge.read(real_b)
    # Resample within each prompt; with one sample per prompt that would change nothing, so then
    # the rows are resampled as one set (the prompts themselves treated as drawn at random).
    strata = groups if per_prompt > 1 else None
    def fids(s, a, b):  # the samples' FID, the reference's, and the excess, on the same resampled rows
        fid, reference = frechet_distance(s, a), frechet_distance(b, a)
        return fid, reference, fid - reference

    figures = bootstrap_intervals(fids, feats, feats_a, feats_b, groups=strata, reps=reps, seed=seed,
                                  correct_bias=True)
    for key, (value, lo, hi) in zip(("fid", "fid_reference", "fid_excess"), figures):
        out[key], out[f"{key}_ci"] = value, [lo, hi]
    if per_prompt > 1:
        out["diversity"] = within_prompt_distance(feats, groups) / within_prompt_distance(feats_a, groups)
    else:
        out["diversity"] = float("nan")  # no two samples of one prompt
    geometric = read_attributes(images)
    out["geometric_all"] = (geometric == labels).all(1).float().mean().item()
    same = geometric == read
    for k, name in enumerate(ATTRIBUTES):
        out[f"agreement_{name}"] = same[:, k].float().mean().item()
    out["agreement_all"] = same.all(1).float().mean().item()
    out["num_images"] = len(labels)
    out["seconds"] = time.perf_counter() - begin
    return out


def within_prompt_distance(feats: torch.Tensor, groups: torch.Tensor) -> float:
    """The mean Euclidean distance between two different rows of `feats` (N, D) in the same group,
    averaged over the groups (N,) with at least two rows. Unlike the spread around a group's mean,
    its expectation does not depend on the group size."""
    total, count = 0.0, 0
    for g in groups.unique():
        f = feats[groups == g].double()
        if len(f) > 1:
            d = torch.pdist(f)  # the k(k − 1)/2 distinct pairs
            total += d.mean().item()
            count += 1
    return total / count if count else float("nan")


# --- uncertainty ------------------------------------------------------------------------------

def resample_indices(groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Row indices drawn with replacement within each group: row i is replaced by a random row of
    its own group, so every group keeps its size (a stratified bootstrap)."""
    order = torch.argsort(groups, stable=True)
    _, sizes = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    size_of_row = sizes.repeat_interleave(sizes)
    start_of_row = starts.repeat_interleave(sizes)
    pick = start_of_row + (torch.rand(len(groups), generator=generator, dtype=torch.float64)
                           * size_of_row).long().clamp(max=size_of_row - 1)
    out = torch.empty_like(order)
    out[order] = order[pick]
    return out


def proportion_interval(hits: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (Wilson 1927) for a proportion of `hits` out of `n`:

        (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)

    Unlike a bootstrap, it does not collapse at 0 or n hits: 600 of 600 gives [99.4 %, 100 %],
    where every resample would also be 600 of 600."""
    from minisd.errors import MinisdError, check_count

    check_count("n", n)
    if not 0 <= hits <= n:
        raise MinisdError(f"hits {hits!r} must be between 0 and n = {n}")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2, dtype=torch.float64)).item()
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 or n hits an end is exactly 0 or 1 (centre ∓ half cancels); rounding must not move it.
    return (0.0 if hits == 0 else centre - half), (1.0 if hits == n else centre + half)


def bootstrap_interval(statistic, *samples: torch.Tensor, groups: torch.Tensor | None = None, reps: int = 1000,
                       level: float = 0.95, seed: int = 0, correct_bias: bool = False) -> tuple[float, float, float]:
    """(estimate, lo, hi): `statistic(*samples)` and its percentile bootstrap interval (Efron &
    Tibshirani 1993, ch. 13).

    Each of `reps` replicates redraws the rows of every sample with replacement — within each of
    `groups` (N,), if given, so that each group keeps its size; then all samples must have N rows
    and share the group labels, and each is redrawn independently. The interval is the central
    `level` of the replicates. With `correct_bias`, both ends are moved by the bootstrap's estimate
    of the bias, mean(replicates) − estimate: for statistics such as FID, which a sample with
    duplicate rows raises, the raw percentiles sit above the estimate.

    The same `seed`, sample sizes and groups draw the same rows, so two calls stay paired.
    """
    return bootstrap_intervals(lambda *s: (statistic(*s),), *samples, groups=groups, reps=reps, level=level,
                               seed=seed, correct_bias=correct_bias)[0]


def bootstrap_intervals(statistic, *samples: torch.Tensor, groups: torch.Tensor | None = None, reps: int = 1000,
                        level: float = 0.95, seed: int = 0,
                        correct_bias: bool = False) -> list[tuple[float, float, float]]:
    """`bootstrap_interval` for a statistic that returns several numbers at once: one
    (estimate, lo, hi) per number, all from the same resampled rows (so they stay paired, and
    work they share is done once per replicate)."""
    from minisd.errors import MinisdError, check_count

    check_count("reps", reps)
    if not 0 < level < 1:
        raise MinisdError(f"level {level!r} must be between 0 and 1")
    if groups is not None and any(len(s) != len(groups) for s in samples):
        raise MinisdError(f"with groups ({len(groups)} rows) every sample needs as many rows; got "
                          f"{[len(s) for s in samples]}")
    g = torch.Generator().manual_seed(seed)
    estimates = torch.tensor([float(v) for v in statistic(*samples)], dtype=torch.float64)
    values = []
    for _ in range(reps):
        if groups is None:
            picks = [torch.randint(0, len(s), (len(s),), generator=g) for s in samples]
        else:
            picks = [resample_indices(groups, g) for _ in samples]
        values.append([float(v) for v in statistic(*(s[i] for s, i in zip(samples, picks)))])
    values = torch.tensor(values, dtype=torch.float64)  # (reps, numbers)
    bounds = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64), dim=0)
    shift = values.mean(0) - estimates if correct_bias else torch.zeros_like(estimates)
    return [(e, lo, hi) for e, lo, hi in zip(estimates.tolist(), (bounds[0] - shift).tolist(),
                                              (bounds[1] - shift).tolist())]


def format_interval(value: float, ci, percent: bool = False, digits: int = 1) -> str:
    """'99.7% [99.2, 100.0]' or '33.47 [31.02, 36.20]'."""
    if percent:
        return f"{100 * value:.{digits}f}% [{100 * ci[0]:.{digits}f}, {100 * ci[1]:.{digits}f}]"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
