"""Per-image latency on this machine: scale-wise 4 steps vs full-resolution 4 steps vs the
teacher's 28 CFG steps, with the toy scales 8 10 12 16.

    python bench/sampler.py            # or: make bench-sampler
    -> bench/results/sampler.json

Model: a randomly initialised SD3Transformer2DModel (12 blocks, width 512) built from a config;
latency does not depend on the weights' values. Every timing covers the whole request: text
encoding, the sampler and the VAE decode.

Why patch size 1 and batch 8 for the headline: scale-wise sampling saves transformer work in
proportion to image tokens. On SD3.5 at 1024 px an image has 4096 tokens against 333 text
tokens, and a GPU is compute-bound. The toy's 16×16 latent with patch 2 has only 64 image
tokens; on a CPU a forward pass over so few tokens is bound by reading the weights, not by
the tokens, which would measure memory bandwidth rather than the sampler. Patch 1 (256 image
tokens at the final scale vs 8 text tokens) and a batch of 8 images put the benchmark in the
token-bound regime the paper's numbers come from. The toy-like layout (patch 2) is measured
too and reported under "other_layouts", whatever it shows.

At SD3.5-Medium size (`--model sd35-medium`, the default with `--device cuda`; bf16 there):

    python bench/sampler.py --device cuda        # -> bench/results/sampler_cuda.json
                                                 # (~5 min on one H100-class GPU by a FLOP estimate,
                                                 # most of it the batch-8 teacher)

a whole SD3.5-Medium pipeline with random weights, built from config at its real sizes: the
MMDiT-X transformer (24 joint blocks, 24 heads x 64 = 1536 wide, dual attention in blocks 0-12,
RMS QK-norm, patch 2, 16 latent channels), CLIP-L, CLIP-G, the T5-XXL encoder and the 16-channel
VAE, at 1024 px with SD3's 333 text tokens (77 CLIP + 256 T5). Scale-wise 4 steps at latent sides
64 80 96 128 (`sd35_medium_4step`) against full-resolution 4 steps (the same sigmas at 128) and
the 28-step teacher with CFG 4.5, batch 1 and 8. What stands in for the real model: the weights
(random: the cost of a forward pass does not depend on them) and the tokenizers (word-level over
a small vocabulary instead of CLIP's BPE and T5's SentencePiece; they pad to the real 77 and 256
tokens, and tokenizing is microseconds next to the encoders). `--quick` shrinks every component
but keeps the same code path (the test's CPU smoke run).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, time_calls, write_result  # noqa: E402
from bench.distill import flop_model_ratio  # noqa: E402
from swd_core.adapters.sd3 import SD3Adapter  # noqa: E402
from swd_core.evaluate_model import PhaseTimer  # noqa: E402
from swd_core.generate import generate_latents  # noqa: E402
from swd_core.schedules import preset  # noqa: E402
from swd_core.tiny_models import BASE_VOCAB, TinySD3Config, build_tiny_sd3, build_tokenizer  # noqa: E402

PROMPT = "a small green triangle"  # fits the 8-token text length


def measure(cfg: TinySD3Config, batch: int, repeats: int, teacher_repeats: int) -> dict:
    adapter = SD3Adapter(build_tiny_sd3(cfg), max_sequence_length=0)
    schedule = preset("toy_4step", cfg.patch_size)
    prompts, seeds = [PROMPT] * batch, list(range(batch))

    def run(**kwargs):
        with torch.no_grad():
            adapter.decode_latents(generate_latents(adapter, prompts, seeds, **kwargs))

    raw = {
        "scalewise": time_calls(lambda: run(schedule=schedule), repeats),
        "fullres": time_calls(lambda: run(schedule=schedule.full_resolution()), repeats),
        "teacher": time_calls(lambda: run(teacher_steps=28, guidance=4.5), teacher_repeats, warmup=0),
    }
    per_image = {k: median(v) / batch for k, v in raw.items()}
    text_tokens = cfg.text_max_length
    image_tokens = [(s // cfg.patch_size) ** 2 for s in schedule.scales]
    return {
        "scalewise_s": per_image["scalewise"], "fullres_s": per_image["fullres"], "teacher_s": per_image["teacher"],
        "ratio_scalewise_vs_fullres": per_image["scalewise"] / per_image["fullres"],
        "ratio_scalewise_vs_teacher": per_image["scalewise"] / per_image["teacher"],
        "layout": {"layers": cfg.layers, "width": cfg.heads * cfg.head_dim, "patch_size": cfg.patch_size,
                   "batch": batch, "image_tokens_per_step": image_tokens, "text_tokens": text_tokens,
                   "token_ratio": (sum(t + text_tokens for t in image_tokens)
                                   / (len(image_tokens) * (image_tokens[-1] + text_tokens))),
                   "transformer_params_m": sum(p.numel() for p in adapter.transformer.parameters()) / 1e6},
        "raw_batch_seconds": raw,
    }


@dataclass(frozen=True)
class TextEncoderSize:
    hidden: int
    layers: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class SD3Size:
    """Every size of a whole SD3 pipeline (transformer, CLIP-L, CLIP-G, T5, VAE)."""

    layers: int
    heads: int
    head_dim: int
    dual_attention_layers: int  # blocks 0..n-1 have a second, image-only attention (SD3.5's MMDiT-X)
    sample_size: int  # latent side at full resolution
    pos_embed_max_size: int
    clip_l: TextEncoderSize
    clip_g: TextEncoderSize
    clip_tokens: int
    clip_vocab: int
    t5: TextEncoderSize
    t5_head_dim: int
    t5_tokens: int
    t5_vocab: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    schedule: str  # the scale-wise preset
    patch_size: int = 2
    latent_channels: int = 16

    @property
    def image_px(self) -> int:
        return self.sample_size * 2 ** (len(self.vae_channels) - 1)

    @property
    def text_tokens(self) -> int:
        return self.clip_tokens + self.t5_tokens


# stabilityai/stable-diffusion-3.5-medium's component configs
SD35_MEDIUM = SD3Size(
    layers=24, heads=24, head_dim=64, dual_attention_layers=13, sample_size=128, pos_embed_max_size=384,
    clip_l=TextEncoderSize(768, 12, 12, 3072), clip_g=TextEncoderSize(1280, 32, 20, 5120), clip_tokens=77,
    clip_vocab=49408, t5=TextEncoderSize(4096, 24, 64, 10240), t5_head_dim=64, t5_tokens=256, t5_vocab=32128,
    vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, schedule="sd35_medium_4step")
# the same layout shrunk for a smoke run: 4 VAE levels (8x), dual attention, T5 wider than both CLIPs
SD35_QUICK = SD3Size(
    layers=2, heads=2, head_dim=32, dual_attention_layers=1, sample_size=16, pos_embed_max_size=16,
    clip_l=TextEncoderSize(32, 1, 2, 64), clip_g=TextEncoderSize(48, 1, 2, 96), clip_tokens=8, clip_vocab=128,
    t5=TextEncoderSize(128, 1, 2, 256), t5_head_dim=32, t5_tokens=8, t5_vocab=128,
    vae_channels=(32, 32, 32, 32), vae_layers_per_block=1, schedule="toy_4step")


def build_sd3_pipeline(size: SD3Size, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised SD3 pipeline with `size`'s components, built on `device` (random
    init of T5-XXL's 4.8B parameters takes minutes on a CPU, a second on a GPU) and cast to
    `dtype` one component at a time, so the float32 copy of only one is ever in memory."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)

    def make(build):
        with torch.device(device):
            return build().to(dtype).eval().requires_grad_(False)

    def clip(s: TextEncoderSize, act: str):
        return make(lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=size.clip_vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, max_position_embeddings=size.clip_tokens, projection_dim=s.hidden,
            hidden_act=act, pad_token_id=0, bos_token_id=2, eos_token_id=3)))

    t5 = size.t5
    components = dict(
        text_encoder=clip(size.clip_l, "quick_gelu"), text_encoder_2=clip(size.clip_g, "gelu"),
        text_encoder_3=make(lambda: T5EncoderModel(T5Config(
            vocab_size=size.t5_vocab, d_model=t5.hidden, d_kv=size.t5_head_dim, d_ff=t5.ffn, num_layers=t5.layers,
            num_heads=t5.heads, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))),
        transformer=make(lambda: SD3Transformer2DModel(
            sample_size=size.sample_size, patch_size=size.patch_size, in_channels=size.latent_channels,
            out_channels=size.latent_channels, num_layers=size.layers, attention_head_dim=size.head_dim,
            num_attention_heads=size.heads, joint_attention_dim=t5.hidden,
            caption_projection_dim=size.heads * size.head_dim,
            pooled_projection_dim=size.clip_l.hidden + size.clip_g.hidden, pos_embed_max_size=size.pos_embed_max_size,
            dual_attention_layers=tuple(range(size.dual_attention_layers)), qk_norm="rms_norm")),
        vae=make(lambda: AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=size.latent_channels, block_out_channels=size.vae_channels,
            layers_per_block=size.vae_layers_per_block, norm_num_groups=min(32, min(size.vae_channels)),
            down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels), sample_size=size.image_px,
            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)),
    )
    clip_tok = build_tokenizer(BASE_VOCAB, size.clip_tokens)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=clip_tok,
                                    tokenizer_2=clip_tok, tokenizer_3=build_tokenizer(BASE_VOCAB, size.t5_tokens),
                                    **components)


def measure_pipeline(adapter: SD3Adapter, size: SD3Size, batch: int, repeats: int, teacher_repeats: int,
                     warmup: int, sync) -> dict:
    """Per-image seconds of one request of `batch` prompts (text encoding, sampler, VAE decode)
    for each sampler; then one more request of each, timed phase by phase."""
    schedule = preset(size.schedule, size.patch_size)
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    samplers = {"scalewise": dict(schedule=schedule), "fullres": dict(schedule=schedule.full_resolution()),
                "teacher": dict(teacher_steps=28, guidance=4.5)}
    finite = {}

    def run(name, target=adapter):
        images = target.decode_latents(generate_latents(target, prompts, seeds, **samplers[name]))
        finite[name] = bool(torch.isfinite(images).all())

    raw, phases = {}, {}
    if sync:
        torch.cuda.reset_peak_memory_stats()  # this batch's peak
    for name in samplers:
        with torch.no_grad():
            teacher = name == "teacher"
            # one warm-up call of the teacher's 28 steps at one shape warms every kernel it uses
            raw[name] = time_calls(lambda name=name: run(name), teacher_repeats if teacher else repeats,
                                   warmup=min(warmup, 1) if teacher else warmup, sync=sync)
            timer = PhaseTimer(adapter)  # syncs around each phase on CUDA
            run(name, timer)
            phases[name] = ({f"{k}_s": v / batch for k, v in timer.seconds.items()}
                            | {"transformer_calls": timer.calls["transformer"]})
    per_image = {k: median(v) / batch for k, v in raw.items()}
    return {
        "batch": batch, "scalewise_s": per_image["scalewise"], "fullres_s": per_image["fullres"],
        "teacher_s": per_image["teacher"],
        "ratio_scalewise_vs_fullres": per_image["scalewise"] / per_image["fullres"],
        "ratio_scalewise_vs_teacher": per_image["scalewise"] / per_image["teacher"],
        "phases_per_image": phases, "images_finite": finite, "raw_batch_seconds": raw,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if sync else None,
    }


def run_sd35(args) -> tuple[dict, str]:
    cuda = args.device == "cuda"
    size = SD35_QUICK if args.quick else SD35_MEDIUM
    dtype = torch.bfloat16 if cuda else torch.float32
    pipe = build_sd3_pipeline(size, args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    adapter = SD3Adapter(pipe, max_sequence_length=size.t5_tokens)
    sync = torch.cuda.synchronize if cuda else None
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
              for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")}
    batches = [int(b) for b in args.batches.split(",")]
    # warm-up runs: CUDA kernels are picked and allocations made on the first call of each shape
    warmup = 2 if cuda else 1
    results = []
    for b in batches:
        r = measure_pipeline(adapter, size, b, args.repeats, args.teacher_repeats, warmup, sync)
        results.append(r)
        print(f"batch {b}: scale-wise {r['scalewise_s']:.4f}s  full-res {r['fullres_s']:.4f}s  "
              f"teacher {r['teacher_s']:.4f}s per image; "
              f"scale-wise / full-res {r['ratio_scalewise_vs_fullres']:.3f}, "
              f"/ teacher {r['ratio_scalewise_vs_teacher']:.3f}", flush=True)
    schedule = preset(size.schedule, size.patch_size)
    transformer_cfg = pipe.transformer.config
    result = {
        "model": "sd35-medium" + ("-quick" if args.quick else ""), "device": args.device,
        "dtype": str(dtype).removeprefix("torch."),
        "image_px": size.image_px, "text_tokens": size.text_tokens,
        "schedule": {"preset": size.schedule, "scales": list(schedule.scales), "sigmas": list(schedule.sigmas)},
        "teacher": {"steps": 28, "guidance": 4.5, "sampler": "euler, CFG (batch doubled)"},
        "sizes": asdict(size), "params_m": params,
        "image_tokens_per_step": [(s // size.patch_size) ** 2 for s in schedule.scales],
        # the transformer alone, from FLOPs: text encoding and VAE decode cost the same in both samplers
        "flop_model_ratio_transformer": flop_model_ratio(transformer_cfg, schedule.scales, size.text_tokens),
        "batches": results,
        "paper": {"ratio_scalewise_vs_fullres_a100": 0.59,
                  "source": "SwD, SD3.5-Medium on A100: swd_4 0.17 s/img vs fullres_dmd_4 0.29 s/img"},
        "goal_ratio_scalewise_vs_fullres": 0.58,
        "meets_goal": {str(r["batch"]): r["ratio_scalewise_vs_fullres"] <= 0.58 for r in results},
        "stand_ins": "random weights; word-level tokenizers padding to the real token counts instead of CLIP BPE / "
                     "T5 SentencePiece" + ("; every component shrunk (--quick)" if args.quick else ""),
        "what": "seconds per image of one request of `batch` prompts, incl. text encoding (CLIP-L, CLIP-G, T5), the "
                "sampler and the VAE decode; median over repeats after warm-up; torch.cuda.synchronize around each "
                "timed call on CUDA. phases_per_image: one further request, synchronized around each phase",
    }
    name = f"sampler_{args.device}" if not args.quick else f"sampler_{args.device}_quick"
    return result, name


def run_toy(args) -> tuple[dict, str]:
    if args.quick:
        headline = measure(TinySD3Config(layers=2, heads=2, patch_size=1, text_max_length=8), 2, 2, 1)
        others = []
    else:
        base = dict(layers=12, heads=8, head_dim=64, text_max_length=8)
        headline = measure(TinySD3Config(patch_size=1, **base), 8, args.repeats, args.teacher_repeats)
        others = [measure(TinySD3Config(patch_size=2, **base), b, args.repeats, args.teacher_repeats) for b in (1, 8)]
    result = {**{k: v for k, v in headline.items()}, "other_layouts": others,
              "schedule": {"scales": [8, 10, 12, 16], "sigmas": list(preset("toy_4step").sigmas)},
              "what": "seconds per image incl. text encoding, sampler and VAE decode; median over repeats"}
    print(f"scale-wise {headline['scalewise_s']:.3f}s  full-res {headline['fullres_s']:.3f}s  "
          f"teacher {headline['teacher_s']:.3f}s per image; ratio vs full-res "
          f"{headline['ratio_scalewise_vs_fullres']:.3f}, vs teacher {headline['ratio_scalewise_vs_teacher']:.3f}")
    for o in others:
        print(f"  patch {o['layout']['patch_size']} batch {o['layout']['batch']}: ratio vs full-res "
              f"{o['ratio_scalewise_vs_fullres']:.3f}, vs teacher {o['ratio_scalewise_vs_teacher']:.3f}")
    return result, "sampler" if not args.quick else "sampler_quick"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=["toy", "sd35-medium"], default=None,
                        help="toy: the 12-block toy-scale bench (cpu default); "
                             "sd35-medium: SD3.5-Medium size, 1024 px (cuda default)")
    parser.add_argument("--batches", default="1,8", help="sd35-medium: comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-repeats", type=int, default=None, help="default: 1 (toy), 3 (sd35-medium)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    args = parser.parse_args(argv)
    args.model = args.model or ("sd35-medium" if args.device == "cuda" else "toy")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.device == "cuda" and args.model == "toy":
        parser.error("--model toy runs on the CPU only (its layouts are chosen for a CPU); use --model sd35-medium")
    if args.teacher_repeats is None:
        args.teacher_repeats = 1 if args.model == "toy" else 3
    torch.manual_seed(0)
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    result, name = (run_sd35 if args.model == "sd35-medium" else run_toy)(args)
    path = write_result(name, result, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
