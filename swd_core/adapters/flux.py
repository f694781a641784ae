"""FLUX.1 adapter over diffusers' `FluxPipeline` components.

What the family owns, so that the scale ops, the store and the losses keep working on unpacked
`(B, C, s, s)` latents:
- packing: the transformer reads 2×2 latent patches as tokens (`_pack_latents`); the adapter
  packs at the call and unpacks the velocity, so a "patch" of the scale schedule is 2;
- position ids: RoPE ids of the packed grid, made for each scale at the call;
- the timestep: the transformer takes sigma itself (it multiplies by 1000 inside);
- guidance: FLUX.1-dev is guidance-distilled. Every call embeds `guidance_scale` (the stock
  pipeline's `guidance_scale`), and "CFG" where SD3 runs two passes is this embedding, so
  `guided_velocity` is one pass;
- feature taps: the double-stream blocks' image tokens, in packed order.
Prompt encoding is the pipeline's own `encode_prompt` (CLIP-L pooled + T5 tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from swd_core.adapters.base import TextEmbeddings, cfg_velocity
from swd_core.adapters.sd3 import TransformerConfigOnly, torch_dtype
from swd_core.feature_taps import StopForward, only_rows_onward, tap_block_outputs

if TYPE_CHECKING:  # the pipeline module imports transformers' models: loaded only when a teacher is
    from diffusers import FluxPipeline

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def load_flux_pipeline(path: str, dtype: str = "float32", load_transformer: bool = True,
                       load_text_encoders: bool = True) -> FluxPipeline:
    """`FluxPipeline.from_pretrained` for a folder, a hub id or a `builtin:tiny-flux` spec, with
    the same switches as the SD3 loader (encoding only; no text encoders for training).

    Args:
        path (`str`): a local diffusers folder, a Hugging Face Hub id or a `builtin:` spec.
        dtype (`str`): the weights' dtype, e.g. "bfloat16".
        load_transformer (`bool`): False loads only the text encoders and the VAE (for
            precomputing); the transformer is then a `TransformerConfigOnly`.
        load_text_encoders (`bool`): False skips CLIP and T5 (training reads precomputed embeddings).

    Returns:
        `FluxPipeline`: with its progress bar off.
    """
    from swd_core.pretrained import use_pil_image_processors
    from swd_core.tiny_models import resolve_pretrained

    use_pil_image_processors()
    from diffusers import FluxPipeline

    path = resolve_pretrained(path)
    kwargs = {} if load_transformer else {"transformer": None}
    if not load_text_encoders:
        kwargs.update(dict.fromkeys(TEXT_COMPONENTS))
    pipe = FluxPipeline.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
    if not load_transformer:
        from diffusers import FluxTransformer2DModel
        from diffusers.configuration_utils import FrozenDict

        config = FluxTransformer2DModel.load_config(path, subfolder="transformer")
        pipe.transformer = TransformerConfigOnly(FrozenDict(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Pack latents into the transformer's 2×2-patch tokens, as `FluxPipeline._pack_latents`.

    Args:
        latents (`torch.Tensor`): (B, C, H, W), H and W even.

    Returns:
        `torch.Tensor`: (B, H/2 · W/2, 4C).
    """
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Unpack tokens into square latents, as `FluxPipeline._unpack_latents`; `pack`'s inverse.

    Args:
        tokens (`torch.Tensor`): (B, side/2 · side/2, 4C).
        side (`int`): the latent side.

    Returns:
        `torch.Tensor`: (B, C, side, side).
    """
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, side, side, 1)


def image_ids(side: int, device, dtype=torch.float32) -> torch.Tensor:
    """RoPE position ids of a `side`×`side` latent's packed tokens, made per call because every
    scale of the schedule has its own grid.

    Args:
        side (`int`): the latent side.
        device (`torch.device` or `str`), dtype (`torch.dtype`): of the ids.

    Returns:
        `torch.Tensor`: (side/2 · side/2, 3).
    """
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, device, dtype)


class FluxAdapter:
    """`FamilyAdapter` for FLUX.1 (see the module's notes on packing, timesteps and guidance).

    Args:
        pipe (`FluxPipeline`): the loaded teacher pipeline (components are used directly).
        max_sequence_length (`int`, defaults to 512): T5 tokens per prompt.
        guidance_scale (`float`, defaults to 3.5): the embedded guidance of a guidance-distilled
            transformer (FLUX.1-dev); ignored by one without a guidance embedding (FLUX.1-schnell).
    """

    family = "flux"
    t5_tokenizer = "tokenizer_2"
    guidance_label = "guidance embedding"  # one pass: FLUX.1-dev is guidance-distilled

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int = 512, guidance_scale: float = 3.5):
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_scale = float(guidance_scale)
        self.transformer = pipe.transformer if isinstance(pipe.transformer, torch.nn.Module) else None
        self.vae = pipe.vae
        self.vae_scale_factor = pipe.vae_scale_factor
        self.patch_size = 2  # the 2×2 packing
        self.latent_channels = int(pipe.transformer.config.in_channels) // 4
        self.num_blocks = int(pipe.transformer.config.num_layers)  # double-stream blocks (feature taps)
        # FLUX's config has no native size; its VAE's is the image size (1024 px for FLUX.1)
        self.native_side = int(pipe.vae.config.sample_size) // self.vae_scale_factor
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.shift_factor = float(pipe.vae.config.shift_factor or 0.0)
        self._empty: TextEmbeddings | None = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", device: str = "cpu", max_sequence_length: int = 512,
                        load_transformer: bool = True, load_text_encoders: bool = True,
                        guidance_scale: float = 3.5) -> "FluxAdapter":
        """Load from a local diffusers folder, a hub id or a `builtin:tiny-flux` spec.

        Args:
            path (`str`), dtype (`str`), load_transformer (`bool`), load_text_encoders (`bool`):
                as for `load_flux_pipeline`.
            device (`str`): where the pipeline's modules go.
            max_sequence_length (`int`), guidance_scale (`float`): see the class.

        Returns:
            `FluxAdapter`
        """
        pipe = load_flux_pipeline(path, dtype, load_transformer, load_text_encoders)
        return cls(pipe.to(device), max_sequence_length=max_sequence_length, guidance_scale=guidance_scale)

    def _first_parameter(self) -> torch.nn.Parameter:
        return next((self.transformer or self.vae).parameters())

    @property
    def device(self) -> torch.device:
        """Where the transformer (or, without one, the VAE) is."""
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's (or, without one, the VAE's) dtype."""
        return self._first_parameter().dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Encode prompts with the pipeline's own `encode_prompt` (CLIP-L pooled + T5 tokens).

        Args:
            prompts (`Sequence[str]` or `str`): one per sample.

        Returns:
            `TextEmbeddings`: in the adapter's dtype.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return TextEmbeddings(embeds.to(self.dtype), pooled.to(self.dtype))

    def empty_prompt(self) -> TextEmbeddings:
        """The empty prompt's embedding (encoded once), for undistilled transformers' CFG.

        Returns:
            `TextEmbeddings`: one row.
        """
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images with the VAE (the posterior mean); see `FamilyAdapter.encode_images`.

        Args:
            images (`torch.Tensor`): (B, 3, H, W) in [-1, 1].

        Returns:
            `torch.Tensor`: normalised, unpacked latents, (B, 16, H / 8, W / 8) for FLUX.1's VAE.
        """
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents with the VAE.

        Args:
            latents (`torch.Tensor`): normalised, unpacked latents, as `encode_images` returns them.

        Returns:
            `torch.Tensor`: images in [-1, 1], in the VAE's dtype.
        """
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    def velocity(self, latents, sigma, text: TextEmbeddings, feature_blocks: Sequence[int] = (),
                 features_only: bool = False, velocity_rows: int | None = None, guidance: float | None = None):
        """The FLUX transformer's velocity (packed at the call, unpacked on return) and the image
        tokens of its double-stream blocks, in packed order.

        See `FamilyAdapter.velocity` for the other arguments and the return value.

        Args:
            guidance (`float`, *optional*): the embedded guidance of this call (default:
                `guidance_scale`); ignored by a transformer without a guidance embedding.
        """
        batch, _, side, _ = latents.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        timestep = sigma.expand(batch) if sigma.ndim == 0 else sigma
        text = text.expand(batch)
        guidance = (torch.full((batch,), self.guidance_scale if guidance is None else guidance, device=latents.device,
                               dtype=torch.float32) if self.guidance_embeds else None)
        blocks = self.transformer.transformer_blocks
        onward = []
        if velocity_rows is not None:
            if not feature_blocks:
                raise ValueError("velocity_rows needs a feature block to cut the batch after")
            onward = [*blocks[max(feature_blocks) + 1:], *self.transformer.single_transformer_blocks,
                      self.transformer.norm_out]
        # FluxTransformerBlock returns (context tokens, image tokens), as SD3's joint block does.
        with (
            tap_block_outputs(blocks, feature_blocks, select=lambda out: out[1],
                              stop_after_last=features_only) as feats,
            only_rows_onward(onward, velocity_rows, batch),
        ):
            try:
                tokens = self.transformer(
                    hidden_states=pack(latents.to(self.dtype)), timestep=timestep.to(self.dtype),
                    guidance=guidance, pooled_projections=text.pooled, encoder_hidden_states=text.prompt_embeds,
                    txt_ids=torch.zeros(text.prompt_embeds.shape[1], 3, device=latents.device, dtype=self.dtype),
                    img_ids=image_ids(side, latents.device, self.dtype), return_dict=False,
                )[0]
                v = unpack(tokens, side)
            except StopForward:
                v = None
        return v, dict(feats)

    def guided_velocity(self, latents, sigma, text: TextEmbeddings, uncond: TextEmbeddings, guidance: float):
        """One pass with `guidance` embedded (guidance-distilled FLUX.1-dev), or classifier-free
        guidance for a transformer without a guidance embedding.

        See `FamilyAdapter.guided_velocity` for the arguments and the return value.
        """
        if not self.guidance_embeds:  # FLUX.1-schnell and other undistilled transformers: real CFG
            return cfg_velocity(self, latents, sigma, text, uncond, guidance)
        return self.velocity(latents, sigma, text, guidance=guidance)[0].float()

    def teacher_sigmas(self, num_steps: int, side: int) -> torch.Tensor:
        """Stock `FluxPipeline`'s sigmas, whose shift follows the image's token count.

        Args:
            num_steps (`int`): the teacher's sampling steps.
            side (`int`): the latent side.

        Returns:
            `torch.Tensor`: `num_steps` sigmas, float32, decreasing from 1 (no terminal 0).
        """
        from swd_core.schedules import flux_sigma_grid

        return flux_sigma_grid(num_steps, (side // 2) ** 2)  # the shift follows the token count
