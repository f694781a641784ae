"""SwD losses as pure functions from tensors to a scalar.

The trainer owns the networks and optimizers; these functions only do the math, so each can
be checked against a value computed by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mmd_linear(feat_real: torch.Tensor, feat_fake: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Linear-kernel MMD between token features of real and generated images: per-image token
    means, then a pseudo-Huber distance mean_{b,c} sqrt((μ_r − μ_f)² + c²) − c.

    Args:
        feat_real (`torch.Tensor`): (B, N, C) token features of the real images.
        feat_fake (`torch.Tensor`): (B, N, C) token features of the generated images.
        c (`float`): the pseudo-Huber constant.

    Returns:
        `torch.Tensor`: the 0-dim loss (float32).
    """
    diff = feat_real.float().mean(dim=1) - feat_fake.float().mean(dim=1)
    return (torch.sqrt(diff.pow(2) + c * c) - c).mean()


def mmd_rbf(feat_real: torch.Tensor, feat_fake: torch.Tensor, bandwidth: float = 100.0) -> torch.Tensor:
    """Unbiased token-level MMD² with k(x, y) = exp(−‖x − y‖² / (2 h²)), averaged over the batch.

    For each image, real tokens X (N, C) and generated tokens Y (M, C):
    MMD² = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j).

    Args:
        feat_real (`torch.Tensor`): (B, N, C) token features of the real images, N >= 2.
        feat_fake (`torch.Tensor`): (B, M, C) token features of the generated images, M >= 2.
        bandwidth (`float`): the kernel bandwidth h.

    Returns:
        `torch.Tensor`: the 0-dim loss (float32).
    """
    x, y = feat_real.float(), feat_fake.float()
    n, m = x.shape[1], y.shape[1]
    if n < 2 or m < 2:
        raise ValueError("mmd_rbf needs at least 2 tokens per image for the unbiased estimate")

    def kernel(a, b):
        sq = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
        sq = sq.clamp_min(0)
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
    The teacher and fake predictions carry no gradient; only x̂ (the student output) does.

    Args:
        x0_student (`torch.Tensor`): the student's clean prediction x̂, with its graph.
        x0_teacher (`torch.Tensor`): the teacher's (guided) clean prediction of x̂ noised.
        x0_fake (`torch.Tensor`): the fake score's clean prediction of the same noised x̂.

    Returns:
        `torch.Tensor`: the 0-dim loss, whose gradient in x̂ is `grad` / numel.
    """
    x = x0_student.float()
    p_real = x - x0_teacher.detach().float()
    p_fake = x - x0_fake.detach().float()
    norm = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    grad = torch.nan_to_num((p_real - p_fake) / norm).detach()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(−D(fake)).

    Args:
        fake_logits (`torch.Tensor`): (B,) GAN head logits of generated samples.

    Returns:
        `torch.Tensor`: the 0-dim loss.
    """
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator loss softplus(−D(real)) + softplus(D(fake)).

    Args:
        real_logits (`torch.Tensor`): (B,) GAN head logits of real samples.
        fake_logits (`torch.Tensor`): (B,) GAN head logits of generated samples.

    Returns:
        `torch.Tensor`: the 0-dim loss.
    """
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def fake_score_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """The fake-score network's diffusion loss: x0-prediction MSE on (stop-grad) student samples.

    Args:
        x0_pred (`torch.Tensor`): the fake score's clean prediction of the noised samples.
        x0_target (`torch.Tensor`): the student samples (no gradient reaches them).

    Returns:
        `torch.Tensor`: the 0-dim loss.
    """
    return F.mse_loss(x0_pred.float(), x0_target.detach().float())
