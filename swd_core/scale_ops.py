"""Scale operations.

- Training targets are downscaled in *pixel* space with area interpolation before the VAE.
- Between sampling steps the x0 prediction (never the noisy latent) is upscaled with bicubic
  interpolation in latent space, then re-noised to the next sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def downscale_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downscale an image batch to `size`×`size` pixels.

    Args:
        images (`torch.Tensor`): (B, C, H, W), H and W >= `size`.
        size (`int`): the target side in pixels.

    Returns:
        `torch.Tensor`: (B, C, size, size); `images` itself when already that size.
    """
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    if size > min(images.shape[-2:]):
        raise ValueError(f"downscale_pixels: target {size}px is larger than the image {tuple(images.shape[-2:])}")
    return F.interpolate(images, size=(size, size), mode="area")


def upscale_latents(x0: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic-upscale a predicted clean latent to `size`×`size`.

    Args:
        x0 (`torch.Tensor`): (B, C, h, w) clean latents (never a noisy one).
        size (`int`): the target latent side.

    Returns:
        `torch.Tensor`: (B, C, size, size); `x0` itself when already that size.
    """
    if x0.shape[-1] == size and x0.shape[-2] == size:
        return x0
    return F.interpolate(x0, size=(size, size), mode="bicubic")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow forward process x_t = (1 − σ) x0 + σ ε.

    Args:
        x0 (`torch.Tensor`): (B, ...) clean latents.
        noise (`torch.Tensor`): ε, shaped like `x0`.
        sigma (`torch.Tensor` or `float`): σ, a scalar or one per sample (B,).

    Returns:
        `torch.Tensor`: x_t, shaped like `x0`.
    """
    sigma = _per_sample(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x̂0 = x_t − σ·v for the velocity parameterisation.

    Args:
        x_t (`torch.Tensor`): (B, ...) noisy latents.
        v (`torch.Tensor`): the predicted velocity at x_t, shaped like it.
        sigma (`torch.Tensor` or `float`): σ of x_t, a scalar or one per sample (B,).

    Returns:
        `torch.Tensor`: the clean prediction x̂0.
    """
    return x_t - _per_sample(sigma, x_t) * v


def _per_sample(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.ndim == 1:
        return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return sigma
