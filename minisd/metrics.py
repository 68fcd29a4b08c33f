"""How close generated samples are to the data.

For point clouds (chapter 2): the maximum mean discrepancy with a Gaussian kernel, and the mean
distance from each sample to its nearest data point. Both are 0 when the two sets coincide.
"""

from __future__ import annotations

import math

import torch


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
        peak = brightness[i].max()
        if peak < 0.3:
            continue
        coverage = (brightness[i] / peak).clamp(0, 1) * (brightness[i] > 0.15)
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


def attribute_accuracy(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The fraction of images whose measured colour, shape, size and position match `labels`
    (N, 4), each alone and all four together."""
    from minisd.data import ATTRIBUTES

    read = read_attributes(images)
    match = read == labels.to(read.device)
    acc = {name: match[:, k].float().mean().item() for k, name in enumerate(ATTRIBUTES)}
    acc["all"] = match.all(1).float().mean().item()
    return acc
