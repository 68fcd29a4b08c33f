"""How close generated samples are to the data.

For point clouds (chapter 2): the maximum mean discrepancy with a Gaussian kernel, and the mean
distance from each sample to its nearest data point. Both are 0 when the two sets coincide.
"""

from __future__ import annotations

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
