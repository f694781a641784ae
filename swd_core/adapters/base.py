"""The small interface every model family implements (SD3 and FLUX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn


@dataclass
class TextEmbeddings:
    """Per-prompt conditioning as the transformer consumes it.

    Args:
        prompt_embeds (`torch.Tensor`): the token embeddings, (B, T, D).
        pooled (`torch.Tensor`): the pooled embeddings, (B, P).
    """

    prompt_embeds: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, P)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, *args, **kwargs) -> "TextEmbeddings":
        """Both tensors moved or cast, as `torch.Tensor.to(*args, **kwargs)` does.

        Returns:
            `TextEmbeddings`: a new pair; this one is unchanged.
        """
        return TextEmbeddings(self.prompt_embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, batch: int) -> "TextEmbeddings":
        """Broadcast a single embedding (e.g. the empty prompt) to `batch` rows.

        Args:
            batch (`int`): the rows wanted; a single embedding is expanded (a view, no copy).

        Returns:
            `TextEmbeddings`: this one if it already has `batch` rows.

        Raises:
            ValueError: it has neither 1 nor `batch` rows.
        """
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} embeddings to batch {batch}")
        return TextEmbeddings(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @staticmethod
    def cat(items: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        """Concatenate along the batch.

        Args:
            items (`Sequence[TextEmbeddings]`): embeddings of equal token length.

        Returns:
            `TextEmbeddings`: their rows, in order.
        """
        return TextEmbeddings(torch.cat([e.prompt_embeds for e in items]), torch.cat([e.pooled for e in items]))


class FamilyAdapter(Protocol):
    """What the training, sampling and evaluation code needs of a model family: its components'
    shapes, prompt and image encoding, and the transformer's velocity. SD3 and FLUX implement it
    (`SD3Adapter`, `FluxAdapter`); `load_adapter` builds one by family name."""

    transformer: nn.Module
    vae_scale_factor: int  # pixels per latent cell
    patch_size: int  # latent cells per token side
    latent_channels: int
    num_blocks: int
    native_side: int  # the latent side the teacher samples at by default
    guidance_scale: float  # embedded guidance fed at every call; 0.0: the family has none
    # class-level, readable before any weights load:
    t5_tokenizer: str  # the pipeline's subfolder of the T5 tokenizer
    guidance_label: str  # what the teacher's guidance is, for plans and reports

    def teacher_sigmas(self, num_steps: int, side: int) -> torch.Tensor:
        """The sigmas the stock pipeline samples `num_steps` steps at latent side `side` with.

        Args:
            num_steps (`int`): the teacher's sampling steps.
            side (`int`): the latent side (FLUX shifts its schedule by resolution; SD3 does not).

        Returns:
            `torch.Tensor`: `num_steps` sigmas, float32, decreasing from 1 (no terminal 0).
        """

    def encode_prompts(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Encode prompts with the family's text encoders.

        Args:
            prompts (`Sequence[str]`): one per sample.

        Returns:
            `TextEmbeddings`: one row per prompt, on the adapter's device and in its dtype.
        """

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images into the latents the transformer works in.

        Args:
            images (`torch.Tensor`): (B, 3, H, W) in [-1, 1].

        Returns:
            `torch.Tensor`: normalised latents (the VAE's shift and scaling applied),
            (B, latent_channels, H / vae_scale_factor, W / vae_scale_factor).
        """

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents into images.

        Args:
            latents (`torch.Tensor`): normalised latents, as `encode_images` returns them.

        Returns:
            `torch.Tensor`: images in [-1, 1], (B, 3, H, W).
        """

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: TextEmbeddings,
        feature_blocks: Sequence[int] = (),
        features_only: bool = False,
        velocity_rows: int | None = None,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The transformer's velocity prediction, and its image-token features on the way.

        Args:
            latents (`torch.Tensor`): noisy latents, (B, C, h, w).
            sigma (`torch.Tensor`): the noise level, a scalar or one per sample.
            text (`TextEmbeddings`): the conditioning, one row per sample.
            feature_blocks (`Sequence[int]`): the blocks whose output image tokens to return (the
                GAN head's input).
            features_only (`bool`): stop after the deepest of `feature_blocks` (no velocity).
            velocity_rows (`int`, *optional*): let only the first n samples go on past the deepest
                feature block, so one pass serves n velocities and B samples' features.

        Returns:
            `tuple[torch.Tensor | None, dict[int, torch.Tensor]]`: the velocity, shaped like
            `latents` (its first `velocity_rows` rows; None with `features_only`), and the
            features by block, (B, N, C) each.
        """

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                        uncond: TextEmbeddings, guidance: float) -> torch.Tensor:
        """The teacher's guided velocity at scale `guidance`: classifier-free guidance (two
        halves in one call) for SD3; the guidance embedding, one pass, for guidance-distilled FLUX.

        Args:
            latents (`torch.Tensor`), sigma (`torch.Tensor`), text (`TextEmbeddings`): as for `velocity`.
            uncond (`TextEmbeddings`): the empty prompt's embedding (unused by FLUX).
            guidance (`float`): the guidance scale.

        Returns:
            `torch.Tensor`: the guided velocity, float32, shaped like `latents`.
        """


def cfg_velocity(adapter: FamilyAdapter, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                 uncond: TextEmbeddings, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + w (v_cond − v_uncond), both halves in one batched call.

    Args:
        adapter (`FamilyAdapter`): the model.
        latents (`torch.Tensor`), sigma (`torch.Tensor`), text (`TextEmbeddings`): as for
            `FamilyAdapter.velocity`.
        uncond (`TextEmbeddings`): the empty prompt's embedding, one row or one per sample.
        guidance (`float`): the scale w.

    Returns:
        `torch.Tensor`: the guided velocity, float32, shaped like `latents`.
    """
    both = TextEmbeddings.cat([uncond.expand(len(text)), text])
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    sigmas = torch.cat([sigma, sigma]) if sigma.ndim else sigma
    v = adapter.velocity(torch.cat([latents, latents]), sigmas, both)[0].float()
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)
