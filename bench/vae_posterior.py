"""How far the VAE posterior's samples are from its mean, on the toy teacher's VAE: the store keeps
the mean, the authors draw a sample for every batch (docs/distill.md, "Latents").

    python bench/vae_posterior.py        # -> bench/results/vae_posterior.json

Per image size: the latents' std (normalised as the SD3 adapter does), the posterior's std in the
same units, and the PSNR of the decoded mean and of a decoded sample against the image and
against each other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from swd_core.adapters import load_adapter  # noqa: E402
from swd_core.evaluation import psnr  # noqa: E402
from swd_core.toy import shapes  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="builtin:toy-sd3")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    adapter = load_adapter("sd3", args.teacher, max_sequence_length=0)
    images = shapes.to_tensor([im for _, _, im in shapes.dataset(shapes.EVAL_SEED, args.images)])
    sf, shift = adapter.scaling_factor, adapter.shift_factor
    rows = {}
    for px in (64, 48, 32):
        x = images if px == images.shape[-1] else F.interpolate(images, size=(px, px), mode="area")
        post = adapter.vae.encode(x).latent_dist
        mean = (post.mean - shift) * sf
        sample = (post.sample(generator=torch.Generator().manual_seed(0)) - shift) * sf
        std = post.std * sf
        dec_mean, dec_sample = adapter.decode_latents(mean), adapter.decode_latents(sample)
        rows[str(px)] = {"latent_std": mean.std().item(), "posterior_std_mean": std.mean().item(),
                         "posterior_std_max": std.max().item(), "sample_std": sample.std().item(),
                         "psnr_mean_decode_db": psnr(x, dec_mean), "psnr_sample_decode_db": psnr(x, dec_sample),
                         "psnr_sample_vs_mean_decode_db": psnr(dec_mean, dec_sample)}
        print(px, {k: round(v, 3) for k, v in rows[str(px)].items()}, flush=True)
    path = write_result("vae_posterior", {"teacher": args.teacher, "images": args.images, "by_size_px": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
