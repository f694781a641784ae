"""Samplers: scale-wise N-step (the student), full-resolution N-step (the baseline), and the
teacher's multi-step Euler sampler with classifier-free guidance.

Every sampler takes a `denoiser(x, sigma) -> velocity` callable so it stays model-agnostic;
`swd_core.generate` binds one to a family adapter and prompts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from swd_core.scale_ops import add_noise, upscale_latents, x0_from_velocity
from swd_core.schedules import ScaleSchedule, sigma_grid

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


Generators = torch.Generator | Sequence[torch.Generator] | None


def initial_noise(batch: int, channels: int, size: int, generator: Generators = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Pure noise at `size` on `device`, as diffusers' `randn_tensor` draws it.

    Args:
        batch (`int`), channels (`int`), size (`int`): the latent's shape (batch, channels, size, size).
        generator (`torch.Generator` or a list of them, *optional*): a list draws each image from its
            own stream; CPU generators give the same noise on every device.
        dtype (`torch.dtype`), device: of the returned tensor.

    Returns:
        `torch.Tensor`: (batch, channels, size, size) standard normal noise.
    """
    return randn_tensor((batch, channels, size, size), generator=generator, dtype=dtype,
                        device=torch.device(device) if device is not None else None)


@torch.no_grad()
def sample_scalewise(denoiser: Denoiser, schedule: ScaleSchedule, noise: torch.Tensor,
                     generator: Generators = None) -> torch.Tensor:
    """SwD inference: predict x̂0 at each scale, bicubic-upscale x̂0 (never the
    noisy latent) to the next scale and re-noise it with fresh noise from `generator`.

    A constant-scale schedule gives the full-resolution few-step sampler.

    Args:
        denoiser (`Denoiser`): (x, σ) -> velocity, e.g. `swd_core.generate.text_denoiser`.
        schedule (`ScaleSchedule`): the scales and sigmas of the steps.
        noise (`torch.Tensor`): the pure-noise latent at `schedule.scales[0]`.
        generator (`torch.Generator` or a list of them, *optional*): the re-noising draws; one per
            image makes an image independent of its batch-mates, as in diffusers' `randn_tensor`.

    Returns:
        `torch.Tensor`: the clean latent at the final scale (float32).
    """
    if noise.shape[-1] != schedule.scales[0]:
        raise ValueError(f"noise is {noise.shape[-1]}x{noise.shape[-2]} but the schedule starts at scale "
                         f"{schedule.scales[0]}")
    sigmas = schedule.sigmas_tensor()
    x = noise
    for i in range(schedule.num_steps):
        # Same float32 arithmetic as diffusers' FlowMatchLCMScheduler.step, so results agree exactly.
        v = denoiser(x, sigmas[i])
        x0 = x0_from_velocity(x.to(torch.float32), v, sigmas[i])
        if i == schedule.num_steps - 1:
            return x0
        x0 = upscale_latents(x0, schedule.scales[i + 1])
        fresh = randn_tensor(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x = add_noise(x0, fresh, sigmas[i + 1]).to(noise.dtype)
    raise AssertionError("unreachable")


def sample_full_resolution(denoiser: Denoiser, schedule: ScaleSchedule, noise: torch.Tensor,
                           generator: Generators = None) -> torch.Tensor:
    """The full-resolution few-step baseline: the same sigmas, every step at the final scale.

    Args and Returns: as `sample_scalewise`, `noise` at the final scale.
    """
    return sample_scalewise(denoiser, schedule.full_resolution(), noise, generator)


@torch.no_grad()
def sample_euler(denoiser: Denoiser, noise: torch.Tensor, num_steps: int = 28, shift: float = 3.0,
                 sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic Euler ODE sampling on the `num_steps` shift-`shift` grid (the teacher's sampler),
    or on the given `num_steps` `sigmas` (a family's own grid, e.g. FLUX's token-count shift).
    Pass a CFG denoiser (`swd_core.generate.cfg_denoiser`) for guided sampling.

    Args:
        denoiser (`Denoiser`): (x, σ) -> velocity.
        noise (`torch.Tensor`): the pure-noise latent.
        num_steps (`int`): Euler steps.
        shift (`float`): the grid's shift, without `sigmas`.
        sigmas (`torch.Tensor`, *optional*): `num_steps` sigmas to step through instead of the grid.

    Returns:
        `torch.Tensor`: the clean latent (float32).
    """
    sigmas = sigma_grid(num_steps, shift) if sigmas is None else sigmas.to(torch.float32)
    if len(sigmas) != num_steps:
        raise ValueError(f"{len(sigmas)} sigmas for {num_steps} steps")
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    x = noise.to(torch.float32)
    for i in range(num_steps):
        v = denoiser(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
