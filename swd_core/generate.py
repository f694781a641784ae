"""Prompt -> image generation with a family adapter: binds the samplers to a model and prompts.

The preview stage, evaluation, benchmarks and serving all sample through here, so they agree.
Every image draws all of its noise from a generator seeded by its own seed, so it is the same
whether generated alone or in a batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from swd_core.adapters.base import FamilyAdapter, TextEmbeddings
from swd_core.samplers import Denoiser, initial_noise, sample_euler, sample_scalewise
from swd_core.schedules import ScaleSchedule


def text_denoiser(adapter: FamilyAdapter, text: TextEmbeddings) -> Denoiser:
    """The model's conditional velocity as a sampler's `Denoiser`, (x, σ) -> v in float32.

    Args:
        adapter (`FamilyAdapter`): the model (teacher, or a student via `Networks.student_sampler`).
        text (`TextEmbeddings`): the batch's prompt embeddings.

    Returns:
        `Denoiser`: (x, σ) -> velocity.
    """

    def denoise(x, sigma):
        return adapter.velocity(x, sigma, text)[0].to(torch.float32)

    return denoise


def cfg_denoiser(adapter: FamilyAdapter, text: TextEmbeddings, uncond: TextEmbeddings, guidance: float) -> Denoiser:
    """The guided teacher: v = v_uncond + w (v_cond − v_uncond), both halves in one batched call
    (SD3), or one pass with the guidance embedding (FLUX.1-dev).

    Args:
        adapter (`FamilyAdapter`): the teacher.
        text (`TextEmbeddings`): the batch's prompt embeddings; `uncond`: the empty prompt's.
        guidance (`float`): w, the guidance scale.

    Returns:
        `Denoiser`: (x, σ) -> guided velocity.
    """

    def denoise(x, sigma):
        return adapter.guided_velocity(x, sigma, text, uncond, guidance)

    return denoise


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed: each image's noise depends on its own seed only.

    Args:
        seeds (`Sequence[int]`): one per image.

    Returns:
        `list[torch.Generator]`: CPU generators (the same draws on any device).
    """
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def generate_latents(adapter: FamilyAdapter, prompts: Sequence[str], seeds: Sequence[int], *,
                     schedule: ScaleSchedule | None = None, teacher_steps: int = 28,
                     guidance: float = 0.0, size: int | None = None) -> torch.Tensor:
    """With a `schedule`: few-step sampling (scale-wise, or full-resolution for a constant-scale
    schedule), no CFG as in SwD. Without: the teacher's Euler sampler, `teacher_steps` steps at
    latent side `size` (default: the model's native one), CFG when `guidance` > 1.

    Args:
        adapter (`FamilyAdapter`): the model that samples.
        prompts (`Sequence[str]`), seeds (`Sequence[int]`): one seed per prompt.
        schedule (`ScaleSchedule`, *optional*): few-step sampling on this schedule.
        teacher_steps (`int`), guidance (`float`), size (`int`, *optional*): the teacher sampler's.

    Returns:
        `torch.Tensor`: (len(prompts), C, side, side) clean latents.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if schedule is not None and guidance > 1.0:
        raise ValueError("few-step (scale-wise / full-resolution) sampling uses no CFG; "
                         "guidance applies to the teacher sampler")
    if schedule is not None and size is not None:
        raise ValueError("a schedule fixes its own sizes; `size` applies to the teacher sampler")
    text = adapter.encode_prompts(list(prompts))
    gens = seed_generators(seeds)
    if schedule is not None:
        noise = initial_noise(len(seeds), adapter.latent_channels, schedule.scales[0], gens, device=adapter.device)
        return sample_scalewise(text_denoiser(adapter, text), schedule, noise, gens)
    side = size or adapter.native_side
    noise = initial_noise(len(seeds), adapter.latent_channels, side, gens, device=adapter.device)
    denoiser = (cfg_denoiser(adapter, text, adapter.empty_prompt(), guidance) if guidance > 1.0
                else text_denoiser(adapter, text))
    return sample_euler(denoiser, noise, teacher_steps, sigmas=adapter.teacher_sigmas(teacher_steps, side))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert images to 8-bit PIL images.

    Args:
        images (`torch.Tensor`): (B, 3, H, W) in [-1, 1].

    Returns:
        `list[Image.Image]`: B RGB images.
    """
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@torch.no_grad()
def generate_images(adapter: FamilyAdapter, prompts: Sequence[str], seeds: Sequence[int],
                    **kwargs) -> list[Image.Image]:
    """`generate_latents`, decoded by the VAE, as PIL images.

    Args:
        adapter (`FamilyAdapter`): the model that samples.
        prompts (`Sequence[str]`), seeds (`Sequence[int]`): one seed per prompt.
        kwargs: `generate_latents`' keyword arguments (`schedule`, `teacher_steps`, `guidance`, `size`).

    Returns:
        `list[Image.Image]`: one RGB image per prompt.
    """
    return to_pil(adapter.decode_latents(generate_latents(adapter, prompts, seeds, **kwargs)))
