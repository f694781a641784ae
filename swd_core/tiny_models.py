"""Small SD3 and FLUX pipelines built from configs, for tests, benchmarks and the embedded default.

No model hub is reachable on a CPU box, so a randomly initialised pipeline is written to a
folder and then loaded through the very same `from_pretrained` path that SD3.5 or FLUX.1 uses.
`builtin:tiny-sd3` (or `builtin:tiny-sd3?layers=4&head_dim=64`) and `builtin:tiny-flux` name such
folders in configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from swd_core.pretrained import use_pil_image_processors
from swd_core.toy import TEACHER

if TYPE_CHECKING:  # the pipeline modules load in the builders, after `use_pil_image_processors`
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

# Enough words to tokenize shapes-style captions; unknown words map to <unk>.
BASE_VOCAB = (
    "a an the of on to in and with is at left right above below top bottom middle center corner "
    "small large big tiny huge circle square triangle star cross diamond heart ring "
    "red green blue yellow purple orange white black gray pink cyan brown background image photo picture"
).split()
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


@dataclass(frozen=True)
class TinySD3Config:
    """Sizes of a small SD3 pipeline (defaults: a few MB, fast on CPU). Each field is an option
    of a `builtin:tiny-sd3?...` spec (`parse_builtin`); `seed` draws the random weights."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 32
    patch_size: int = 2
    latent_channels: int = 4
    sample_size: int = 16  # latent side length
    vae_channels: tuple[int, ...] = (32, 32, 32)  # 3 levels -> 4x downsampling
    text_dim: int = 32
    text_layers: int = 1
    text_max_length: int = 16
    # SD3.5 crops its sincos position grid to the image (pos_embed_max_size), which suits a model
    # trained at many resolutions. A model trained at one size then puts a smaller image's tokens
    # on the centre positions; interpolating the grid (pos_embed_max_size=None) keeps a small
    # image's corners on the corner positions, so the toy teacher, trained at 64 px only, still
    # places objects right at the smaller scales of a scale-wise schedule.
    interpolate_pos_embed: bool = False
    seed: int = 0

    def key(self) -> str:
        """A short hash of the sizes, naming the cached folder of this configuration."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(vocab: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer wrapped in `PreTrainedTokenizerFast` (saves and reloads offline).

    Args:
        vocab (`list[str]`): the words, lower case; any other word reads as `<unk>`.
        max_length (`int`): the tokenizer's `model_max_length`.

    Returns:
        `PreTrainedTokenizerFast`: lower-casing, splitting on whitespace, wrapping each text in
        `<bos>` … `<eos>`.
    """
    words = SPECIALS + [w for w in dict.fromkeys(vocab) if w not in SPECIALS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )


def build_tiny_sd3(cfg: TinySD3Config = TinySD3Config(), vocab: list[str] | None = None) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3 pipeline: two small CLIP towers sharing one word-level
    tokenizer, no T5, an SD3 transformer and a VAE, with SD3.5's scheduler (shift 3).

    Args:
        cfg (`TinySD3Config`): the sizes and the seed.
        vocab (`list[str]`, *optional*): the tokenizer's words; defaults to `BASE_VOCAB`.

    Returns:
        `StableDiffusion3Pipeline`: in memory; `resolve_pretrained` saves it for `from_pretrained`.
    """
    use_pil_image_processors()
    from diffusers import StableDiffusion3Pipeline

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(vocab or BASE_VOCAB, cfg.text_max_length)
    text_cfg = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=cfg.text_dim * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=2, max_position_embeddings=cfg.text_max_length,
        projection_dim=cfg.text_dim, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    inner = cfg.heads * cfg.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_dim, caption_projection_dim=inner,
        pooled_projection_dim=2 * cfg.text_dim,
        pos_embed_max_size=None if cfg.interpolate_pos_embed else cfg.sample_size // cfg.patch_size,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=min(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        sample_size=cfg.sample_size * 2 ** (len(cfg.vae_channels) - 1),
        scaling_factor=1.0, shift_factor=0.0,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of a small FLUX.1 pipeline: CLIP-L's role (pooled text) and T5's (token sequence),
    a 16-channel VAE with a shift and a scale, and a `FluxTransformer2DModel` with double- and
    single-stream blocks and, like FLUX.1-dev, a guidance embedding. Each field is an option of
    a `builtin:tiny-flux?...` spec (`parse_builtin`); `seed` draws the random weights."""

    layers: int = 2  # double-stream blocks
    single_layers: int = 2
    heads: int = 2
    head_dim: int = 32
    rope_axes: tuple[int, ...] = (8, 12, 12)  # sums to head_dim, as FLUX's (16, 56, 56) sums to 128
    latent_channels: int = 16
    sample_size: int = 16  # latent side length (unpacked)
    vae_channels: tuple[int, ...] = (32, 32, 32)  # 3 levels -> 4x (FLUX.1's VAE: 4 levels, 8x)
    clip_dim: int = 32
    t5_dim: int = 32
    text_max_length: int = 16
    guidance_embeds: bool = True
    seed: int = 0

    def key(self) -> str:
        """A short hash of the sizes, naming the cached folder of this configuration."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_flux(cfg: TinyFluxConfig = TinyFluxConfig(), vocab: list[str] | None = None) -> FluxPipeline:
    """A randomly initialised FLUX.1 pipeline: a small CLIP and T5 sharing one word-level
    tokenizer, a FLUX transformer and a VAE, with FLUX.1's resolution-dependent scheduler.

    Args:
        cfg (`TinyFluxConfig`): the sizes and the seed.
        vocab (`list[str]`, *optional*): the tokenizer's words; defaults to `BASE_VOCAB`.

    Returns:
        `FluxPipeline`: in memory; `resolve_pretrained` saves it for `from_pretrained`.

    Raises:
        ValueError: `rope_axes` do not sum to `head_dim`.
    """
    if sum(cfg.rope_axes) != cfg.head_dim:
        raise ValueError(f"rope_axes {list(cfg.rope_axes)} must sum to head_dim {cfg.head_dim}")
    use_pil_image_processors()
    from diffusers import FluxPipeline

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(vocab or BASE_VOCAB, cfg.text_max_length)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.clip_dim, intermediate_size=cfg.clip_dim * 4, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=cfg.text_max_length, pad_token_id=0, bos_token_id=2,
        eos_token_id=3))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=cfg.t5_dim, d_kv=cfg.t5_dim // 2,
                                 d_ff=cfg.t5_dim * 2, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=3,
                                 decoder_start_token_id=0, dropout_rate=0.0))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.latent_channels * 4, num_layers=cfg.layers, num_single_layers=cfg.single_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.t5_dim,
        pooled_projection_dim=cfg.clip_dim, guidance_embeds=cfg.guidance_embeds, axes_dims_rope=tuple(cfg.rope_axes))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=cfg.vae_channels,
        layers_per_block=1, norm_num_groups=min(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        sample_size=cfg.sample_size * 2 ** (len(cfg.vae_channels) - 1),
        scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    # FLUX.1's scheduler: the shift follows the image's token count (`mu`)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer, transformer=transformer)


def _cache_root() -> Path:
    return Path(os.environ.get("SWD_CACHE", Path.home() / ".cache" / "swd"))


BUILDERS = {"tiny-sd3": (TinySD3Config, build_tiny_sd3), "tiny-flux": (TinyFluxConfig, build_tiny_flux)}


def parse_builtin(spec: str) -> TinySD3Config | TinyFluxConfig:
    """The configuration a builtin spec names.

    Args:
        spec (`str`): e.g. `builtin:tiny-sd3?layers=4&head_dim=64` or `builtin:tiny-flux`; tuple
            options are comma-separated (`vae_channels=32,32`), booleans 0 or 1.

    Returns:
        `TinySD3Config` or `TinyFluxConfig`

    Raises:
        ValueError: an unknown model or option, with the allowed ones.
    """
    name, _, query = spec.removeprefix("builtin:").partition("?")
    if name not in BUILDERS:
        raise ValueError(f"unknown builtin model {name!r}; allowed: ['toy-sd3', {', '.join(map(repr, BUILDERS))}]")
    config_class = BUILDERS[name][0]
    fields = config_class.__dataclass_fields__
    kwargs = {}
    for part in filter(None, query.split("&")):
        k, _, v = part.partition("=")
        if k not in fields:
            raise ValueError(f"builtin:{name} has no option {k!r}; allowed: {sorted(fields)}")
        if k in ("vae_channels", "rope_axes"):
            kwargs[k] = tuple(int(x) for x in v.split(","))
        else:
            kwargs[k] = bool(int(v)) if fields[k].type in (bool, "bool") else int(v)
    return config_class(**kwargs)


TOY_TEACHER = TEACHER  # the committed toy teacher


def resolve_pretrained(path: str) -> str:
    """A path `from_pretrained` loads.

    Args:
        path (`str`): `builtin:toy-sd3` (the committed toy teacher), a `builtin:tiny-sd3...` or
            `builtin:tiny-flux...` spec (built once into `$SWD_CACHE`, default ~/.cache/swd, shared by
            concurrent processes), or anything else (a local folder or a hub id).

    Returns:
        `str`: the folder of a builtin model; any other path unchanged.

    Raises:
        FileNotFoundError: the toy teacher's weights are not in the checkout.
    """
    if not str(path).startswith("builtin:"):
        return str(path)
    if path == "builtin:toy-sd3":
        if not (TOY_TEACHER / "model_index.json").exists():
            raise FileNotFoundError(f"the toy teacher is not in {TOY_TEACHER}; train it with `make toy-teacher`")
        return str(TOY_TEACHER)
    cfg = parse_builtin(str(path))
    name = str(path).removeprefix("builtin:").partition("?")[0]
    folder = _cache_root() / f"{name}-{cfg.key()}"
    if not (folder / "model_index.json").exists():
        # Write aside, then rename: concurrent processes never see a half-written folder.
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        BUILDERS[name][1](cfg).save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def clip_bpe_tokenizer():
    """A CLIP tokenizer (byte-level BPE) whose vocabulary is the 256 byte symbols alone, with and
    without the end-of-word mark, and no merges: every prompt tokenizes, letter by letter.

    Returns:
        `CLIPTokenizer`
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_clip(folder: str | Path, *, seed: int = 0, image_size: int = 32, with_processor: bool = True) -> str:
    """A randomly initialised `CLIPModel` (2 layers per tower, width 32) and, with
    `with_processor`, its `CLIPProcessor`, saved to `folder` as a Hub checkpoint is laid out.

    Args:
        folder (`str` or `Path`): where to save.
        seed (`int`): draws the weights.
        image_size (`int`): the vision tower's input side (patches of 8 px).
        with_processor (`bool`): also save the processor (without it, a test names another
            folder as the processor's, as PickScore does).

    Returns:
        `str`: `folder`.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = clip_bpe_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    if with_processor:
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
        CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def save_tiny_dinov2(folder: str | Path, *, seed: int = 0, image_size: int = 32) -> str:
    """A randomly initialised `Dinov2Model` (2 layers, width 32) and its image processor (resize,
    centre crop, ImageNet normalization, as the Hub checkpoints ship it), saved to `folder`.

    Args:
        folder (`str` or `Path`): where to save.
        seed (`int`): draws the weights.
        image_size (`int`): the input side (patches of 8 px).

    Returns:
        `str`: `folder`.
    """
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=image_size, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)
