"""Quality of the embedded default: the evaluator on real images, the VAE, and the toy teacher
at 28 steps with CFG and at 4 steps without, on the held-out prompts.

    python bench/teacher_quality.py        # or: make bench-teacher
    -> bench/results/teacher_quality.json and bench/results/teacher_quality.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, write_result  # noqa: E402
from swd_core.adapters.sd3 import SD3Adapter  # noqa: E402
from swd_core.evaluate_model import ShapesScorer, latency_split, sample_images  # noqa: E402
from swd_core.evaluation import psnr  # noqa: E402
from swd_core.generate import to_pil  # noqa: E402
from swd_core.grid import image_grid  # noqa: E402
from swd_core.toy import shapes  # noqa: E402

GUIDANCE = 4.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=640, help="held-out prompts to evaluate (max 640)")
    parser.add_argument("--teacher", default="builtin:toy-sd3")
    parser.add_argument("--name", default="teacher_quality", help="result name: bench/results/<name>.json and .png")
    args = parser.parse_args()
    torch.manual_seed(0)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    adapter = SD3Adapter.from_pretrained(args.teacher, max_sequence_length=0)
    samples = shapes.held_out_prompts()[:args.prompts]
    prompts, seeds = [s.caption for s in samples], list(range(len(samples)))
    # The same scoring as the pipeline's evaluate stage (swd_core.evaluate_model).
    scorer = ShapesScorer(samples)
    real = scorer.real
    result = {"n_prompts": len(samples), "classifier_real_accuracy": scorer.real_accuracy["prompt_accuracy"]}
    with torch.no_grad():
        recon = torch.cat([adapter.decode_latents(adapter.encode_images(real[i:i + 64])) for i in range(0, len(real), 64)])
    result["vae_psnr_db"] = psnr(real, recon)
    grids = {}
    for name, steps, guidance in (("teacher_28_cfg", 28, GUIDANCE), ("teacher_4", 4, 0.0)):
        start = time.perf_counter()
        images = sample_images(adapter, prompts, seeds, teacher_steps=steps, guidance=guidance)
        acc, _ = scorer.score(images)
        # Latency as a user sees it: one prompt per call, text encoding + sampler + VAE decode.
        lat = latency_split(adapter, prompts[0], 0, repeats=5, teacher_steps=steps, guidance=guidance)
        result[name] = {"acc_one_object": acc["acc_one_object"], "acc_two_object": acc["acc_two_object"],
                        "prompt_accuracy": acc["prompt_accuracy"], "per_attribute": acc["per_attribute"],
                        "fd": acc["fd"], "latency_s": lat["total_s"], "latency_raw_s": lat["raw"]["total_s"],
                        "latency_split_s": {k: lat[k] for k in ("text_s", "transformer_s", "vae_s", "other_s")},
                        "steps": steps, "guidance": guidance, "batch_seconds": time.perf_counter() - start}
        grids[name] = images
        print(f"{name}: one-object {acc['acc_one_object']:.3f} two-object {acc['acc_two_object']:.3f} "
              f"FD {acc['fd']:.2f} latency {lat['total_s']:.3f}s", flush=True)
    result["fd_ratio_28cfg_vs_4"] = result["teacher_28_cfg"]["fd"] / result["teacher_4"]["fd"]
    rows = list(range(0, min(len(samples), 12)))
    labels = ["real (rendered)", f"teacher 28 steps cfg {GUIDANCE}", "teacher 4 steps"]
    columns = [to_pil(real[rows]), to_pil(grids["teacher_28_cfg"][rows]), to_pil(grids["teacher_4"][rows])]
    t28, t4 = result["teacher_28_cfg"], result["teacher_4"]
    title = (f"toy-sd3 | 28 cfg: acc1 {t28['acc_one_object']:.2f} acc2 {t28['acc_two_object']:.2f} FD {t28['fd']:.1f} "
             f"{t28['latency_s']:.2f}s | 4 steps: acc1 {t4['acc_one_object']:.2f} acc2 {t4['acc_two_object']:.2f} "
             f"FD {t4['fd']:.1f} {t4['latency_s']:.3f}s | VAE {result['vae_psnr_db']:.1f} dB")
    grid = image_grid([[c[i] for c in columns] for i in range(len(rows))], [prompts[i] for i in rows], labels,
                      title=title)
    RESULTS.mkdir(parents=True, exist_ok=True)
    grid.save(RESULTS / f"{args.name}.png")
    print(f"wrote {write_result(args.name, result)} and {RESULTS / f'{args.name}.png'}")


if __name__ == "__main__":
    main()
