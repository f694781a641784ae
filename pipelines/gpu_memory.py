"""Estimated GPU memory of each GPU stage of a definition, checked at plan time against the GPU
memory the definition names (`cluster.gpu.memory`) or the launcher's instance type.

The distill estimate extrapolates one measurement (bench/results/distill_medium_t333_cuda.json:
SD3.5 Medium's width, 12 of its 24 blocks, micro-batch 8, 4096 image + 333 text tokens, one
H100): 53.7 GB peak, of which 2.0 GB are the bf16 weights, so 4.31 GB of activations and adapter
state per block. Activations grow linearly with blocks, width, tokens and micro-batch (no
activation checkpointing). Sampling stages count their weights with an allowance for
activations. docs/cluster.md ("GPU sizing") walks through the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipelines.schema import PipelineConfig

GB = 1e9
# the measurement above: per block, at this width, token count and micro-batch
BLOCK_GB, REF_WIDTH, REF_TOKENS, REF_MICRO = 4.31, 1536, 4096 + 333, 8
# LoRA parameters per block, per rank, per unit of width: q, k, v and out (8 w) and both
# feed-forwards (2 × 10 w) of the default targets
LORA_PER_BLOCK = 28
CLIP_TOKENS = 77  # SD3 puts CLIP's tokens before T5's
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAMPLING_ALLOWANCE = (1.1, 2.0)  # weights × 1.1 + 2 GB: activations of a sampling batch, the CUDA context


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a teacher: its transformer's depth, width and parameters, and
    the parameters of its text encoders (T5 counted only with `max_sequence_length` > 0) and VAE."""

    name: str
    blocks: int
    width: int
    transformer_params: float
    t5_params: float
    clip_params: float
    vae_params: float = 0.084e9


T5_XXL = 4.76e9
# the Hub's published pipelines, for an estimate without their files (no network at plan time)
KNOWN = {
    "stabilityai/stable-diffusion-3.5-medium": Architecture("SD3.5 Medium", 24, 1536, 2.47e9, T5_XXL, 0.82e9),
    "stabilityai/stable-diffusion-3.5-large": Architecture("SD3.5 Large", 38, 2432, 8.06e9, T5_XXL, 0.82e9),
    "stabilityai/stable-diffusion-3.5-large-turbo":
        Architecture("SD3.5 Large Turbo", 38, 2432, 8.06e9, T5_XXL, 0.82e9),
    "black-forest-labs/FLUX.1-dev": Architecture("FLUX.1-dev", 19 + 38, 3072, 11.9e9, T5_XXL, 0.123e9),
    "black-forest-labs/FLUX.1-schnell": Architecture("FLUX.1-schnell", 19 + 38, 3072, 11.9e9, T5_XXL, 0.123e9),
}
TEXT_PARAMS = {"sd3": (T5_XXL, 0.82e9), "flux": (T5_XXL, 0.123e9)}  # (T5, CLIP) of an unknown teacher


def teacher_architecture(cfg: PipelineConfig) -> Architecture | None:
    """The teacher's architecture from its own transformer config (a local folder, or the Hugging
    Face cache for a Hub id; nothing is downloaded), else from `KNOWN`; None when neither says."""
    path = cfg.teacher.path
    if path.startswith("builtin:"):
        return None  # the embedded toy and tiny pipelines: megabytes
    from swd_core.pretrained import pretrained_file

    config = pretrained_file(path, "transformer/config.json")
    if config is None:
        return KNOWN.get(path)
    c = json.loads(config.read_text())
    blocks = int(c.get("num_layers", 0)) + int(c.get("num_single_layers", 0))
    width = int(c.get("num_attention_heads", 0)) * int(c.get("attention_head_dim", 0))
    params = _stored_params(path)
    known = KNOWN.get(path)
    if not (blocks and width) or (params is None and known is None):
        return known
    t5, clip = TEXT_PARAMS[cfg.teacher.family]
    return Architecture(f"{path} ({blocks} blocks, width {width})", blocks, width,
                        params if params is not None else known.transformer_params, t5, clip)


def _stored_params(path: str) -> float | None:
    """Parameters of the transformer's safetensors files, from their headers (no tensor is read)."""
    from swd_core.pretrained import pretrained_file

    index = pretrained_file(path, "transformer/diffusion_pytorch_model.safetensors.index.json")
    names = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index
             else ["diffusion_pytorch_model.safetensors"])
    total = 0
    for name in names:
        f = pretrained_file(path, f"transformer/{name}")
        if f is None:
            return None
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, t in header.items():
            if key != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return float(total)


@dataclass(frozen=True)
class Need:
    stage: str
    setting: str  # the field that gives the stage its GPUs
    gb: float  # estimated peak per GPU
    how: str  # what the estimate counts, for the message


def stage_needs(cfg: PipelineConfig, arch: Architecture | None = None) -> list[Need]:
    """Per GPU stage the definition runs: the estimated GPU memory of one worker, actor or replica."""
    arch = arch or teacher_architecture(cfg)
    if arch is None:
        return []
    nbytes = DTYPE_BYTES[cfg.teacher.dtype]
    t5 = arch.t5_params if cfg.teacher.max_sequence_length > 0 else 0.0
    text_gb, transformer_gb = (t5 + arch.clip_params) * nbytes / GB, arch.transformer_params * nbytes / GB
    vae_gb = arch.vae_params * nbytes / GB
    pipeline_gb = transformer_gb + text_gb + vae_gb
    scale, add = SAMPLING_ALLOWANCE
    needs = []
    s, p, r, e, v = cfg.synthesize, cfg.precompute, cfg.resources, cfg.evaluate, cfg.serve
    if "synthesize" in cfg.stages and s.enabled and s.gpus_per_actor:
        needs.append(Need("synthesize", "synthesize.gpus_per_actor", pipeline_gb * scale + add,
                          f"{arch.name} pipeline weights {pipeline_gb:.1f} GB + sampling"))
    if "precompute" in cfg.stages and p.gpus_per_actor:
        needs.append(Need("precompute", "precompute.gpus_per_actor", (text_gb + vae_gb) * scale + add,
                          f"text encoders and VAE {text_gb + vae_gb:.1f} GB + a batch"))
    if "distill" in cfg.stages and r.gpus_per_worker:
        needs.append(distill_need(cfg, arch))
    if ("evaluate" in cfg.stages or "preview" in cfg.stages) and e.gpus:
        needs.append(Need("evaluate", "evaluate.gpus", pipeline_gb * scale + add,
                          f"{arch.name} pipeline weights {pipeline_gb:.1f} GB + sampling"))
    if "deploy" in cfg.stages and v.gpus_per_replica:
        needs.append(Need("deploy", "serve.gpus_per_replica", pipeline_gb * scale + add,
                          f"the student's pipeline weights {pipeline_gb:.1f} GB + a batch"))
    return needs


def distill_need(cfg: PipelineConfig, arch: Architecture) -> Need:
    d, r = cfg.distill, cfg.resources
    micro = d.batch_size // r.num_workers
    side = max(cfg.schedule().scales) // cfg.teacher.resolved_patch_size
    text = cfg.teacher.max_sequence_length + (CLIP_TOKENS if cfg.teacher.family == "sd3" else 0)
    tokens = side * side + text
    activations = BLOCK_GB * arch.blocks * (arch.width / REF_WIDTH) * (tokens / REF_TOKENS) * (micro / REF_MICRO)
    weights = arch.transformer_params * DTYPE_BYTES[cfg.teacher.dtype] / GB
    lora = (2 if d.mode == "lora" else 1) * arch.blocks * d.lora.rank * arch.width * LORA_PER_BLOCK
    # bf16 weights and gradients, fp32 Adam moments and master weights sharded over the workers (ZeRO-2)
    state = lora * (4 + 16 / r.num_workers) / GB
    if d.mode == "full":
        state += arch.transformer_params * (4 + 16 / r.num_workers) / GB
    total = activations + weights + state
    return Need("distill", "resources.gpus_per_worker", total,
                f"{arch.name}, micro-batch {micro}, {tokens} tokens: activations {activations:.1f} GB + weights "
                f"{weights:.1f} GB + trained state {state:.1f} GB")


def memory_problems(cfg: PipelineConfig, gpu_bytes: int, source: str) -> list[str]:
    """One line per GPU stage whose estimate exceeds what its GPU holds; `source` names where the
    GPU memory came from (a field of the definition, or the launcher's instance type)."""
    out = []
    for need in stage_needs(cfg):
        share = min(_gpus(cfg, need.setting), 1.0)  # a model lives on one device; fractions share it
        have = gpu_bytes * share / GB
        if need.gb > have:
            shared = f" ({share:g} of a GPU)" if share < 1 else ""
            out.append(f"{source}: {need.stage} needs ≈ {need.gb:.0f} GB per GPU ({need.how}), a GPU there holds "
                       f"{have:.0f} GB{shared}; use GPUs with more memory{_smaller(need)}")
    return out


def _gpus(cfg: PipelineConfig, setting: str) -> float:
    section, field = setting.split(".")
    return float(getattr(getattr(cfg, section), field))


def _smaller(need: Need) -> str:
    if need.stage == "distill":
        return ", or a smaller micro-batch (more resources.num_workers, or a smaller distill.batch_size)"
    if need.stage in ("synthesize", "precompute"):
        return f", or a smaller {need.stage}.batch_size"
    return ""
