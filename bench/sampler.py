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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median, time_calls, write_result  # noqa: E402
from swd_core.adapters.sd3 import SD3Adapter  # noqa: E402
from swd_core.generate import generate_latents  # noqa: E402
from swd_core.schedules import preset  # noqa: E402
from swd_core.tiny_models import TinySD3Config, build_tiny_sd3  # noqa: E402

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
                   "token_ratio": sum(t + text_tokens for t in image_tokens) / (len(image_tokens) * (image_tokens[-1] + text_tokens)),
                   "transformer_params_m": sum(p.numel() for p in adapter.transformer.parameters()) / 1e6},
        "raw_batch_seconds": raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
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
    path = write_result("sampler" if not args.quick else "sampler_quick", result)
    print(f"scale-wise {headline['scalewise_s']:.3f}s  full-res {headline['fullres_s']:.3f}s  "
          f"teacher {headline['teacher_s']:.3f}s per image; ratio vs full-res "
          f"{headline['ratio_scalewise_vs_fullres']:.3f}, vs teacher {headline['ratio_scalewise_vs_teacher']:.3f}")
    for o in others:
        print(f"  patch {o['layout']['patch_size']} batch {o['layout']['batch']}: ratio vs full-res "
              f"{o['ratio_scalewise_vs_fullres']:.3f}, vs teacher {o['ratio_scalewise_vs_teacher']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
