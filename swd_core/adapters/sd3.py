"""Stable Diffusion 3 / 3.5 adapter over diffusers' `StableDiffusion3Pipeline` components.

Prompt encoding is the pipeline's own `encode_prompt` (CLIP-L + CLIP-G [+ T5]), so embeddings
are exactly what stock SD3 sampling feeds the transformer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from swd_core.adapters.base import TextEmbeddings, cfg_velocity
from swd_core.feature_taps import StopForward, only_rows_onward, tap_block_outputs

if TYPE_CHECKING:  # the pipeline module imports transformers' models: loaded only when a teacher is
    from diffusers import StableDiffusion3Pipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a definition names.

    Args:
        name (`str`): a key of `DTYPES` ("float32", "bfloat16", "float16").

    Returns:
        `torch.dtype`

    Raises:
        ValueError: an unsupported name, with the allowed ones.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def _absent_components(path: str) -> dict:
    """Optional components a local folder does not ship (e.g. no T5), passed as None so
    `from_pretrained` accepts the folder exactly as `save_pretrained` wrote it."""
    index = Path(path) / "model_index.json"
    if not index.exists():
        return {}
    saved = json.loads(index.read_text())
    return {k: None for k in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
            if saved.get(k, [None, None])[0] is None}


class TransformerConfigOnly:
    """Stands in for a transformer that was not loaded: its config only (no weights, not a
    module). Encoding prompts and images needs a few config values (e.g. the zero T5 tokens'
    width when there is no T5) but not SD3.5-Large's 16 GB of transformer weights.

    Args:
        config (`FrozenDict`): the transformer's config, as `SD3Transformer2DModel.load_config` reads it.
    """

    def __init__(self, config):
        self.config = config


TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


def load_sd3_pipeline(path: str, dtype: str = "float32", load_transformer: bool = True,
                      load_text_encoders: bool = True) -> StableDiffusion3Pipeline:
    """`StableDiffusion3Pipeline.from_pretrained` for a folder, a hub id or a `builtin:` spec.

    Args:
        path (`str`): a local diffusers folder, a Hugging Face Hub id or a `builtin:` spec.
        dtype (`str`): the weights' dtype, e.g. "bfloat16".
        load_transformer (`bool`): False loads only the text encoders and the VAE (for
            precomputing); the transformer is then a `TransformerConfigOnly`.
        load_text_encoders (`bool`): False skips CLIP and T5 (training reads precomputed
            embeddings, and T5-XXL alone is 9 GB in bf16).

    Returns:
        `StableDiffusion3Pipeline`: with its progress bar off.
    """
    from swd_core.pretrained import use_pil_image_processors
    from swd_core.tiny_models import resolve_pretrained

    use_pil_image_processors()
    from diffusers import StableDiffusion3Pipeline

    path = resolve_pretrained(path)
    kwargs = {} if load_transformer else {"transformer": None}
    if not load_text_encoders:
        kwargs.update(dict.fromkeys(TEXT_COMPONENTS))
    kwargs = {**_absent_components(path), **kwargs}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
    if not load_transformer:
        from diffusers import SD3Transformer2DModel
        from diffusers.configuration_utils import FrozenDict

        config = SD3Transformer2DModel.load_config(path, subfolder="transformer")
        pipe.transformer = TransformerConfigOnly(FrozenDict(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SD3Adapter:
    """`FamilyAdapter` for Stable Diffusion 3 / 3.5.

    Args:
        pipe (`StableDiffusion3Pipeline`): the loaded teacher pipeline (components are used directly).
        max_sequence_length (`int`, defaults to 256): T5 token count. When the pipeline has no T5
            encoder, SD3 feeds this many zero tokens; small models may set it to 0.
    """

    family = "sd3"
    t5_tokenizer = "tokenizer_3"
    guidance_label = "cfg"  # two passes, conditional and unconditional
    guidance_scale = 0.0  # no guidance embedding

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int = 256):
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)
        # None when loaded with `load_transformer=False`: encoding only, no sampling.
        self.transformer = pipe.transformer if isinstance(pipe.transformer, torch.nn.Module) else None
        self.vae = pipe.vae
        self.vae_scale_factor = pipe.vae_scale_factor
        self.patch_size = int(pipe.transformer.config.patch_size)
        self.latent_channels = int(pipe.transformer.config.in_channels)
        self.num_blocks = int(pipe.transformer.config.num_layers)
        self.native_side = int(pipe.transformer.config.sample_size)
        self.scaling_factor = float(pipe.vae.config.scaling_factor)
        self.shift_factor = float(pipe.vae.config.shift_factor or 0.0)
        self._empty: TextEmbeddings | None = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", device: str = "cpu",
                        max_sequence_length: int = 256, load_transformer: bool = True,
                        load_text_encoders: bool = True) -> "SD3Adapter":
        """Load from a local diffusers folder, a hub id or a `builtin:` spec (the same call SD3.5 uses).

        Args:
            path (`str`), dtype (`str`), load_transformer (`bool`), load_text_encoders (`bool`):
                as for `load_sd3_pipeline`.
            device (`str`): where the pipeline's modules go.
            max_sequence_length (`int`): T5 token count (see the class).

        Returns:
            `SD3Adapter`
        """
        pipe = load_sd3_pipeline(path, dtype, load_transformer, load_text_encoders)
        return cls(pipe.to(device), max_sequence_length=max_sequence_length)

    def _first_parameter(self) -> torch.nn.Parameter:
        # diffusers' `ModelMixin.device` / `.dtype` walk every module (4 ms a call here); the
        # training step asks for the dtype on each of its ~20 transformer calls.
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
        """Encode prompts with the pipeline's own `encode_prompt` (CLIP-L + CLIP-G [+ T5]).

        Args:
            prompts (`Sequence[str]` or `str`): one per sample.

        Returns:
            `TextEmbeddings`: in the adapter's dtype.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return TextEmbeddings(embeds.to(self.dtype), pooled.to(self.dtype))

    def empty_prompt(self) -> TextEmbeddings:
        """The unconditional embedding used for classifier-free guidance (encoded once).

        Returns:
            `TextEmbeddings`: one row, the empty prompt's.
        """
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images with the VAE; see `FamilyAdapter.encode_images`.

        Args:
            images (`torch.Tensor`): (B, 3, H, W) in [-1, 1].

        Returns:
            `torch.Tensor`: normalised latents, (B, 16, H / 8, W / 8) for SD3's VAE.
        """
        # The posterior mean, not a sample: precomputed latents are then deterministic per image.
        z = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents with the VAE.

        Args:
            latents (`torch.Tensor`): normalised latents, as `encode_images` returns them.

        Returns:
            `torch.Tensor`: images in [-1, 1], in the VAE's dtype.
        """
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    def velocity(self, latents, sigma, text: TextEmbeddings, feature_blocks: Sequence[int] = (),
                 features_only: bool = False, velocity_rows: int | None = None):
        """The SD3 transformer's velocity and the image tokens of its joint blocks (timestep =
        1000 sigma, as SD3's scheduler feeds it).

        See `FamilyAdapter.velocity` for the arguments and the return value.
        """
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        timestep = (sigma * 1000).expand(batch) if sigma.ndim == 0 else sigma * 1000
        text = text.expand(batch)
        blocks = self.transformer.transformer_blocks
        onward = []  # what runs after the deepest tapped block: later blocks, then the output layers
        if velocity_rows is not None:
            if not feature_blocks:
                raise ValueError("velocity_rows needs a feature block to cut the batch after")
            onward = [*blocks[max(feature_blocks) + 1:], self.transformer.norm_out]
        # JointTransformerBlock returns (context tokens, image tokens); MMD and the GAN read image tokens.
        with (
            tap_block_outputs(blocks, feature_blocks, select=lambda out: out[1],
                              stop_after_last=features_only) as feats,
            only_rows_onward(onward, velocity_rows, batch),
        ):
            try:
                v = self.transformer(
                    hidden_states=latents.to(self.dtype), timestep=timestep,
                    encoder_hidden_states=text.prompt_embeds, pooled_projections=text.pooled,
                    return_dict=False,
                )[0]
            except StopForward:
                v = None
        return v, dict(feats)

    def guided_velocity(self, latents, sigma, text: TextEmbeddings, uncond: TextEmbeddings, guidance: float):
        """Classifier-free guidance (`cfg_velocity`); see `FamilyAdapter.guided_velocity` for the
        arguments and the return value."""
        return cfg_velocity(self, latents, sigma, text, uncond, guidance)

    def teacher_sigmas(self, num_steps: int, side: int) -> torch.Tensor:
        """SD3.5's scheduler grid, shift 3 at every size.

        Args:
            num_steps (`int`): the teacher's sampling steps.
            side (`int`): the latent side (unused: SD3 does not shift by resolution).

        Returns:
            `torch.Tensor`: `num_steps` sigmas, float32, decreasing from 1 (no terminal 0).
        """
        from swd_core.schedules import sigma_grid

        return sigma_grid(num_steps)  # SD3.5's scheduler: shift 3 at every size
