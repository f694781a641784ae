"""The small interface every model family implements (SD3 and FLUX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn


@dataclass
class TextEmbeddings:
    """Per-prompt conditioning as the transformer consumes it."""

    prompt_embeds: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor  # (B, P)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, *args, **kwargs) -> "TextEmbeddings":
        return TextEmbeddings(self.prompt_embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, batch: int) -> "TextEmbeddings":
        """Broadcast a single embedding (e.g. the empty prompt) to `batch` rows."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} embeddings to batch {batch}")
        return TextEmbeddings(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @staticmethod
    def cat(items: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        return TextEmbeddings(torch.cat([e.prompt_embeds for e in items]), torch.cat([e.pooled for e in items]))


class FamilyAdapter(Protocol):
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
        """The sigmas the stock pipeline samples `num_steps` steps at latent side `side` with."""

    def encode_prompts(self, prompts: Sequence[str]) -> TextEmbeddings: ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> normalised latents (shift and scaling applied)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1]."""

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        text: TextEmbeddings,
        feature_blocks: Sequence[int] = (),
        features_only: bool = False,
        velocity_rows: int | None = None,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Velocity at noise level `sigma` (scalar or per sample) plus image-token features
        (B, N, C) after each requested block. `features_only` stops after the deepest block;
        `velocity_rows` n lets only the first n samples go on past it (velocity of n rows)."""

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                        uncond: TextEmbeddings, guidance: float) -> torch.Tensor:
        """The teacher's guided velocity at scale `guidance`: classifier-free guidance (two
        halves in one call) for SD3; the guidance embedding, one pass, for guidance-distilled FLUX."""


def cfg_velocity(adapter: FamilyAdapter, latents: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                 uncond: TextEmbeddings, guidance: float) -> torch.Tensor:
    """v_uncond + w (v_cond − v_uncond), float32; both halves in one batched call."""
    both = TextEmbeddings.cat([uncond.expand(len(text)), text])
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    sigmas = torch.cat([sigma, sigma]) if sigma.ndim else sigma
    v = adapter.velocity(torch.cat([latents, latents]), sigmas, both)[0].float()
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)
