"""What a toy VAE leaves a perfect transformer, and how sharp an image the evaluator needs to read it.

    python bench/vae_ceiling.py                                   # the committed teacher's VAE
    python bench/vae_ceiling.py --vae swd_core/toy/.work/v3/vae --name vae_ceiling_v3 --image round_trip.png
    -> bench/results/<name>.json (and the picture: 12 held-out renders at 32 px over their round trip)

Per image size (32, 40, 48, 64 px; held-out prompts, real renders area-downscaled as
`ShapesScorer(size=...)` makes them): the evaluator's one-object and two-object accuracy, per
attribute, and FD, on
- `real`: the renders themselves (what the evaluator can read);
- `vae`: the renders encoded and decoded (the posterior's mode), with their PSNR;
- `real_blur3`: the renders under a 3×3 box blur, a reference for how much softness the
  evaluator tolerates at that size (upscaled to 64 px, a small image's edges spread over 2 px).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from swd_core.evaluate_model import ShapesScorer  # noqa: E402
from swd_core.evaluation import load_classifier, psnr  # noqa: E402
from swd_core.generate import to_pil  # noqa: E402
from swd_core.grid import image_grid  # noqa: E402
from swd_core.toy import CLASSIFIER, TEACHER, shapes  # noqa: E402
from swd_core.toy.train import reconstruct  # noqa: E402

SIZES = (32, 40, 48, 64)


def blur3(images: torch.Tensor) -> torch.Tensor:
    """A 3×3 box blur, edges replicated."""
    return F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def scores(scorer: ShapesScorer, images: torch.Tensor) -> dict:
    acc, _ = scorer.score(images)
    return {"acc_one_object": acc["acc_one_object"], "acc_two_object": acc["acc_two_object"], "fd": acc["fd"],
            "per_attribute": acc["per_attribute"]}


@torch.no_grad()
def main(argv: list[str] | None = None) -> Path:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", type=Path, default=TEACHER / "vae", help="an AutoencoderKL folder")
    parser.add_argument("--prompts", type=int, default=320, help="held-out prompts (max 640)")
    parser.add_argument("--name", default="vae_ceiling", help="bench/results/<name>.json")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here instead")
    parser.add_argument("--image", type=Path, default=None,
                        help="also write a PNG: the first 12 renders at 32 px (top row) over their round trip")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval()
    classifier = load_classifier(CLASSIFIER)
    samples = shapes.held_out_prompts()[:args.prompts]
    rows = {}
    for px in SIZES:
        scorer = ShapesScorer(samples, classifier, size=px)
        rec = reconstruct(vae, scorer.real)
        rows[str(px)] = {"real": scores(scorer, scorer.real), "vae": {**scores(scorer, rec),
                                                                      "psnr_db": psnr(scorer.real, rec)},
                         "real_blur3": scores(scorer, blur3(scorer.real))}
        print(px, {k: round(v["acc_one_object"], 3) for k, v in rows[str(px)].items()}, flush=True)
        if args.image and px == SIZES[0]:
            # renders over their round trip, enlarged 4x with nearest-neighbour so single pixels show
            pictures = [to_pil(scorer.real[:12]), to_pil(rec[:12])]
            image_grid(pictures, ["", ""], [""] * len(pictures[0]), cell=4 * px, label_width=0,
                       header=0).save(args.image)
    config = vae.config
    return write_result(args.name, {"vae": str(args.vae), "latent_channels": config.latent_channels,
                             "block_out_channels": list(config.block_out_channels), "prompts": len(samples),
                             "sizes": rows}, args.out)


if __name__ == "__main__":
    main()
