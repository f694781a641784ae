"""Scores of a model's samples computed with the teacher alone: no classifier, no hub weights, so
they apply to any teacher (the promotion gate of scheduled retraining uses them).

- `teacher_denoise`: the teacher's flow-matching loss on the samples noised to one fixed sigma,
  with their own prompts. It is low where the samples lie where the teacher puts its data.
- `teacher_fd`: the Fréchet distance between the features of the samples and of the teacher's own
  samples of the same prompts and seeds. The features are the teacher's image tokens at one block,
  mean-pooled, taken at that same sigma and noise, and projected to `dim` dimensions by a fixed
  random orthonormal map. The projection keeps the covariances full rank with a few hundred
  samples: SD3.5's 1536-wide tokens would otherwise need thousands.

- `teacher_alignment`: how much the sample's own prompt helps the teacher denoise it, the
  teacher's flow-matching loss without the prompt minus that with it, on the samples noised to
  several sigmas (an implicit text-image agreement, as diffusion classifiers read it). Higher is
  better: a sample that shows its prompt is one the prompted teacher explains better than the
  unprompted one.

- `teacher_cfg_denoise`: the teacher's flow-matching loss with its CFG velocity (the one its
  sampler follows) on the samples noised to low sigmas. Lower is better: the guided teacher
  barely moves a sample that already shows its prompt.

The noise for image i comes from its seed alone, so two models scored on the same prompts and
seeds see the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swd_core.adapters import FamilyAdapter
from swd_core.frechet import frechet_distance

NOISE_OFFSET = 1_000_003  # the scoring noise is not the sampling noise of the same seed


def _noise(shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + NOISE_OFFSET))
                        for s in seeds])


def projection(width: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed random map to fewer dimensions, so covariances stay full rank with few samples.

    Args:
        width (`int`): the features' width.
        dim (`int`): the projected width.
        seed (`int`): the map's seed; the same seed gives the same map in every process.

    Returns:
        `torch.Tensor`: (width, dim) with orthonormal columns; the identity when dim >= width.
    """
    if dim >= width:
        return torch.eye(width)
    q, _ = torch.linalg.qr(torch.randn(width, dim, generator=torch.Generator().manual_seed(seed)))
    return q


@torch.no_grad()
def teacher_readings(teacher: FamilyAdapter, latents: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int], *,
                     sigma: float = 0.5, block: int | None = None, dim: int = 64,
                     batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's denoising loss and features of samples noised to `sigma` (one forward pass
    gives both).

    Args:
        teacher (`FamilyAdapter`): the teacher.
        latents (`torch.Tensor`): the samples' latents, (N, C, h, w) at the teacher's latent size.
        prompts (`Sequence[str]`): each sample's own prompt.
        seeds (`Sequence[int]`): each sample's seed, which alone draws its scoring noise.
        sigma (`float`): the noise level.
        block (`int`, *optional*): the tapped block; defaults to the middle one.
        dim (`int`): the features' projected width (`projection`).
        batch_size (`int`): samples per forward pass.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the per-image flow-matching loss (N,) and the
        projected, token-mean-pooled features (N, dim), on the CPU.
    """
    if not (len(latents) == len(prompts) == len(seeds)):
        raise ValueError(f"got {len(latents)} latents, {len(prompts)} prompts and {len(seeds)} seeds")
    blocks = teacher.num_blocks
    block = blocks // 2 if block is None else block
    if not 0 <= block < blocks:
        raise ValueError(f"block {block}: the teacher has blocks 0..{blocks - 1}")
    losses, feats = [], []
    proj = None
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        x = latents[start:stop].to(teacher.device, torch.float32)
        eps = _noise(tuple(x.shape[1:]), seeds[start:stop]).to(x.device)
        noisy = (1 - sigma) * x + sigma * eps
        text = teacher.encode_prompts(list(prompts[start:stop]))
        v, taps = teacher.velocity(noisy, sigma, text, feature_blocks=(block,))
        losses.append(((v.float() - (eps - x)) ** 2).flatten(1).mean(1).cpu())
        pooled = taps[block].float().mean(1).cpu()  # (batch, width): image tokens, mean-pooled
        if proj is None:
            proj = projection(pooled.shape[1], dim)
        feats.append(pooled @ proj)
    return torch.cat(losses), torch.cat(feats)


def teacher_fd(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between two sets of `teacher_readings` features.

    Args:
        features (`torch.Tensor`): the model's samples' features, (n, dim).
        reference (`torch.Tensor`): the teacher's own samples' features, (m, dim).

    Returns:
        `float`

    Raises:
        ValueError: fewer than 2 rows on a side.
    """
    if len(features) < 2 or len(reference) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images on each side")
    return frechet_distance(features, reference)


def _prompt_errors(teacher: FamilyAdapter, latents, prompts, seeds, sigmas, batch_size, guidance=None):
    """Per-image (N, len(sigmas)) losses of the conditional and unconditional velocities, or with
    `guidance` the one loss of the CFG velocity; the same noise for both prompts and every sigma."""
    if not (len(latents) == len(prompts) == len(seeds)):
        raise ValueError(f"got {len(latents)} latents, {len(prompts)} prompts and {len(seeds)} seeds")
    if not sigmas or not all(0 < s < 1 for s in sigmas):
        raise ValueError(f"sigmas must be in (0, 1), got {list(sigmas)}")
    from swd_core.adapters.base import TextEmbeddings

    empty = teacher.empty_prompt()
    cond, uncond = [], []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        x = latents[start:stop].to(teacher.device, torch.float32)
        eps = _noise(tuple(x.shape[1:]), seeds[start:stop]).to(x.device)
        target = eps - x  # the flow-matching velocity

        def loss(v):
            return ((v - target) ** 2).flatten(1).mean(1).cpu()

        both = TextEmbeddings.cat([teacher.encode_prompts(list(prompts[start:stop])), empty.expand(stop - start)])
        c, u = [], []
        for sigma in sigmas:
            noisy = (1 - sigma) * x + sigma * eps
            vc, vu = teacher.velocity(torch.cat([noisy, noisy]), sigma, both)[0].float().chunk(2)  # one call
            if guidance is None:
                c.append(loss(vc)), u.append(loss(vu))
            else:
                c.append(loss(vu + guidance * (vc - vu)))
        cond.append(torch.stack(c, 1))
        if u:
            uncond.append(torch.stack(u, 1))
    return torch.cat(cond), (torch.cat(uncond) if uncond else None)


@torch.no_grad()
def teacher_alignment(teacher: FamilyAdapter, latents: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int], *,
                      sigmas: Sequence[float] = (0.3, 0.45, 0.6, 0.75), batch_size: int = 32) -> torch.Tensor:
    """Per-image (N,) mean over `sigmas` of ||v(x_t, "") - (eps - x)||^2 - ||v(x_t, prompt) - (eps - x)||^2
    (per-element means), the same noise for both prompts and every sigma.

    Args:
        teacher (`FamilyAdapter`): the teacher.
        latents (`torch.Tensor`), prompts (`Sequence[str]`), seeds (`Sequence[int]`): as for
            `teacher_readings`.
        sigmas (`Sequence[float]`): noise levels in (0, 1).
        batch_size (`int`): samples per forward pass.

    Returns:
        `torch.Tensor`: (N,); higher is better.
    """
    cond, uncond = _prompt_errors(teacher, latents, prompts, seeds, sigmas, batch_size)
    return (uncond - cond).mean(1)


@torch.no_grad()
def teacher_cfg_denoise(teacher: FamilyAdapter, latents: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int],
                        *, sigmas: Sequence[float] = (0.3, 0.45), guidance: float = 4.5,
                        batch_size: int = 32) -> torch.Tensor:
    """Per-image (N,) mean over `sigmas` of ||v_cfg(x_t, prompt) - (eps - x)||^2 (per-element mean),
    v_cfg = v("") + guidance (v(prompt) - v("")).

    Args:
        teacher (`FamilyAdapter`): the teacher.
        latents (`torch.Tensor`), prompts (`Sequence[str]`), seeds (`Sequence[int]`): as for
            `teacher_readings`.
        sigmas (`Sequence[float]`): noise levels in (0, 1).
        guidance (`float`): the CFG scale.
        batch_size (`int`): samples per forward pass.

    Returns:
        `torch.Tensor`: (N,); lower is better.
    """
    return _prompt_errors(teacher, latents, prompts, seeds, sigmas, batch_size, guidance=guidance)[0].mean(1)
