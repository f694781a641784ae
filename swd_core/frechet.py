"""The Fréchet distance between Gaussians fitted to two feature sets (FID's formula, on any
features): ‖μa − μb‖² + Tr Σa + Tr Σb − 2 Tr (Σa Σb)^½.

It is computed from factors of the covariances, Σ = F Fᵀ: the eigenvalues of Σa Σb are the
squared singular values of Faᵀ Fb, so the last trace is the sum of those singular values. That
is exact, needs no matrix square root, handles fewer images than feature dimensions (an n × n
problem when n < d), and batches over leading dimensions, which the bootstrap resamples use.
"""

from __future__ import annotations

import numpy as np
import torch


def _factor(x: torch.Tensor) -> torch.Tensor:
    """(..., n, d) features -> (..., d, k) factors F with F Fᵀ = the sample covariance."""
    n, d = x.shape[-2:]
    xc = x - x.mean(-2, keepdim=True)
    if n - 1 <= d:  # the centred data itself: k = n
        return xc.transpose(-1, -2) / np.sqrt(n - 1)
    cov = xc.transpose(-1, -2) @ xc / (n - 1)
    w, v = torch.linalg.eigh(cov)
    return v * w.clamp_min(0).sqrt().unsqueeze(-2)


def frechet_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to `a` and `b`, (..., n, d) each, batched over
    the leading dimensions, in float64.

    Args:
        a (`torch.Tensor`), b (`torch.Tensor`): features, (..., n, d), at least 2 rows each.

    Returns:
        `torch.Tensor`: float64, one distance per leading index (a scalar for 2-d inputs).
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.shape[-2] < 2 or b.shape[-2] < 2:
        raise ValueError("the Fréchet distance needs at least 2 images on each side")
    fa, fb = _factor(a), _factor(b)
    mean_term = ((a.mean(-2) - b.mean(-2)) ** 2).sum(-1)
    traces = (fa ** 2).sum((-1, -2)) + (fb ** 2).sum((-1, -2))
    return mean_term + traces - 2 * torch.linalg.svdvals(fa.transpose(-1, -2) @ fb).sum(-1)


def frechet_distance(a, b) -> float:
    """The Fréchet distance of two feature sets (`frechet_distances` on one pair).

    Args:
        a, b (`np.ndarray` or `torch.Tensor`): features, (n, d) each.

    Returns:
        `float`
    """
    return float(frechet_distances(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))))


def fd_mean_term(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """The ‖μa − μb‖² part of the Fréchet distance: every image shifted the same way (brightness,
    a colour cast), as opposed to lost or wrong variety (the covariance part).

    Args:
        features_a, features_b (`np.ndarray` or `torch.Tensor`): (n, d) features each.

    Returns:
        `float`
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum())
