"""Cost of the evaluate stage's image metrics per 1000 images, from FLOPs: each metric model is
built from its published configuration (no weights: the meta device), one image (and one
77-token prompt for the CLIP models) is run under torch's FLOP counter, and the time on a GPU is
estimated at an assumed fraction of its peak. `--measure` also times random-weight models of
the same shapes on this machine's device (weights do not change the time).

    python bench/metric_cost.py                     # FLOPs and the estimate -> bench/results/metric_cost.json
    python bench/metric_cost.py --measure --images 8  # and a timing here
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Published sizes: openai/clip-vit-large-patch14; laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore
# v1 is a fine-tune of it, same shapes); facebook/dinov2-large.
CLIP_L = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12),
              vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=224, patch_size=14),
              projection_dim=768)
CLIP_H = dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16),
              vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=16, image_size=224, patch_size=14),
              projection_dim=1024)
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                image_size=518)
# Peak dense throughput of an H100 SXM (TFLOP/s) by the dtype the matmuls run in, and the
# fraction of it assumed for these batched encoders: an assumption until measured.
H100_PEAK = {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}
UTILIZATION = 0.4
TEXT_TOKENS = 77
IMAGE_SIDE = 224  # what the processors feed each model


def models(device: str):
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    with torch.device(device):
        return {"clip_score": CLIPModel(CLIPConfig(**CLIP_L)).eval(),
                "pickscore": CLIPModel(CLIPConfig(**CLIP_H)).eval(),
                "fd_dinov2": Dinov2Model(Dinov2Config(**DINOV2_L)).eval()}


@torch.no_grad()
def forward(name: str, model, images: torch.Tensor):
    if name == "fd_dinov2":
        return model(pixel_values=images)
    ids = torch.ones(len(images), TEXT_TOKENS, dtype=torch.long, device=images.device)
    return model.get_image_features(pixel_values=images), model.get_text_features(input_ids=ids)


def flops_per_image() -> dict:
    out = {}
    for name, model in models("meta").items():
        counter = FlopCounterMode(display=False)
        with counter:
            forward(name, model, torch.zeros(1, 3, IMAGE_SIDE, IMAGE_SIDE, device="meta"))
        out[name] = {"gflops_per_image": counter.get_total_flops() / 1e9,
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    return out


@torch.no_grad()
def measure(images: int, device: str) -> dict:
    out = {}
    for name, model in models(device).items():
        x = torch.rand(images, 3, IMAGE_SIDE, IMAGE_SIDE, device=device)
        forward(name, model, x[:1])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward(name, model, x)
        if device == "cuda":
            torch.cuda.synchronize()
        out[name] = {"seconds_per_1000_images": (time.perf_counter() - start) / images * 1000, "images": images}
        del model
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "metric_cost.json"))
    args = parser.parse_args()
    result = {"image_side": IMAGE_SIDE, "text_tokens": TEXT_TOKENS, "utilization_assumed": UTILIZATION,
              "peak_tflops_h100": H100_PEAK, "metrics": flops_per_image()}
    for m in result["metrics"].values():
        m["estimated_h100_seconds_per_1000_images"] = {
            dtype: m["gflops_per_image"] * 1000 / (peak * 1e3 * UTILIZATION) for dtype, peak in H100_PEAK.items()}
    if args.measure:
        result["measured"] = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
                              "threads": torch.get_num_threads(), **measure(args.images, args.device)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
