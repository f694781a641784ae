"""SwD losses as pure functions from tensors to a scalar.

The trainer owns the networks and optimizers; these functions only do the math, so each can
be checked against a value computed by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mmd_linear(feat_real: torch.Tensor, feat_fake: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Linear-kernel MMD between token features (B, N, C) of real and generated images:
    per-image token means, then a pseudo-Huber distance mean_{b,c} sqrt((μ_r − μ_f)² + c²) − c."""
    diff = feat_real.float().mean(dim=1) - feat_fake.float().mean(dim=1)
    return (torch.sqrt(diff.pow(2) + c * c) - c).mean()


def mmd_rbf(feat_real: torch.Tensor, feat_fake: torch.Tensor, bandwidth: float = 100.0) -> torch.Tensor:
    """Unbiased token-level MMD² with k(x, y) = exp(−‖x − y‖² / (2 h²)), averaged over the batch.

    For each image, real tokens X (N, C) and generated tokens Y (M, C):
    MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j).
    """
    x, y = feat_real.float(), feat_fake.float()
    n, m = x.shape[1], y.shape[1]
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 tokens per image for the unbiased estimate")

    def kernel(a, b):
        sq = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)).clamp_min(0)
        return torch.exp(-sq / (2 * bandwidth**2))

    def off_diagonal_sum(k):  # the unbiased estimator leaves out k(x_i, x_i)
        return k.sum(dim=(1, 2)) - k.diagonal(dim1=1, dim2=2).sum(-1)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    xx = off_diagonal_sum(kxx) / (n * (n - 1))
    yy = off_diagonal_sum(kyy) / (m * (m - 1))
    xy = kxy.mean(dim=(1, 2))
    return (xx + yy - 2 * xy).mean()


def dmd_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Distribution matching (DMD2 form). With p_real = x̂ − x0_teacher and p_fake = x̂ − x0_fake,
    grad = (p_real − p_fake) / mean|p_real| (per sample); loss = 0.5 · MSE(x̂, stopgrad(x̂ − grad)).
    The teacher and fake predictions carry no gradient; only x̂ (the student output) does."""
    x = x0_student.float()
    p_real = x - x0_teacher.detach().float()
    p_fake = x - x0_fake.detach().float()
    norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    grad = torch.nan_to_num((p_real - p_fake) / norm).detach()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(−D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """softplus(−D(real)) + softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def fake_score_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """The fake-score network's diffusion loss: x0-prediction MSE on (stop-grad) student samples."""
    return F.mse_loss(x0_pred.float(), x0_target.detach().float())
