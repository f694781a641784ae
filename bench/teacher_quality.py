"""Quality of the embedded default: the evaluator on real images, the VAE, and the toy teacher on
the held-out prompts at every resolution SwD asks it about.

    python bench/teacher_quality.py        # or: make bench-teacher
    -> bench/results/teacher_quality.json and bench/results/teacher_quality.png

Per resolution (32, 40, 48, 64 px: latent sides 8, 10, 12, 16, the toy 4-step scales): the teacher
at 28 steps with CFG and at 4 steps without, sampled at that size. Images smaller than 64 px are
upscaled (bilinear) for the classifier, and their FD compares them with real renders
area-downscaled to the same size and upscaled the same way (`ShapesScorer(size=...)`), so a
column measures the teacher at that resolution, not the resolution's blur. The evaluator's own
accuracy on those real renders is reported per resolution too, and on the same renders
encoded and decoded by the VAE (`vae_round_trip`: the ceiling the VAE leaves a perfect
transformer). Then the teacher sampled
scale-wise with the toy 4-step schedule and no distillation (`teacher_scalewise_4`, 64 px).
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
from swd_core.evaluate_model import ShapesScorer, latency_split, sample_images, to_evaluator_size  # noqa: E402
from swd_core.evaluation import psnr  # noqa: E402
from swd_core.generate import to_pil  # noqa: E402
from swd_core.grid import image_grid  # noqa: E402
from swd_core.schedules import preset  # noqa: E402
from swd_core.toy import shapes  # noqa: E402

GUIDANCE = 4.5
RESOLUTIONS = (32, 40, 48, 64)


def scores(acc: dict) -> dict:
    return {"acc_one_object": acc["acc_one_object"], "acc_two_object": acc["acc_two_object"],
            "prompt_accuracy": acc["prompt_accuracy"], "per_attribute": acc["per_attribute"], "fd": acc["fd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=640, help="held-out prompts to evaluate (max 640)")
    parser.add_argument("--teacher", default="builtin:toy-sd3")
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(RESOLUTIONS))
    parser.add_argument("--name", default="teacher_quality", help="result name: bench/results/<name>.json and .png")
    args = parser.parse_args()
    torch.manual_seed(0)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    adapter = SD3Adapter.from_pretrained(args.teacher, max_sequence_length=0)
    factor = adapter.vae_scale_factor
    samples = shapes.held_out_prompts()[:args.prompts]
    prompts, seeds = [s.caption for s in samples], list(range(len(samples)))
    result = {"n_prompts": len(samples), "teacher": args.teacher, "guidance": GUIDANCE, "by_resolution": {}}
    grids = {}
    for px in args.resolutions:
        if px % factor:
            parser.error(f"--resolutions: {px} px is not a multiple of the VAE's factor {factor}")
        side = px // factor
        # The same scoring as the pipeline's evaluate stage (swd_core.evaluate_model).
        scorer = ShapesScorer(samples, size=px)
        real = scorer.real
        with torch.no_grad():
            recon = torch.cat([adapter.decode_latents(adapter.encode_images(real[i:i + 64]))
                               for i in range(0, len(real), 64)])
        row = {"latent_side": side, "classifier_real_accuracy": scorer.real_accuracy["prompt_accuracy"],
               "classifier_real_acc_one_object": scorer.real_accuracy["acc_one_object"],
               "classifier_real_acc_two_object": scorer.real_accuracy["acc_two_object"],
               "vae_psnr_db": psnr(real, recon), "fd_floor": scorer.fd_floor(len(samples)),
               # real renders through the VAE and back: what a perfect transformer could reach
               "vae_round_trip": scores(scorer.score(recon)[0])}
        for name, steps, guidance in (("teacher_28_cfg", 28, GUIDANCE), ("teacher_4", 4, 0.0)):
            start = time.perf_counter()
            images = sample_images(adapter, prompts, seeds, teacher_steps=steps, guidance=guidance, size=side)
            acc, _ = scorer.score(images)
            row[name] = {**scores(acc), "steps": steps, "guidance": guidance,
                         "batch_seconds": time.perf_counter() - start}
            if px == shapes.IMAGE_SIZE:  # latency as a user sees it: one prompt per call, text + sampler + VAE
                lat = latency_split(adapter, prompts[0], 0, repeats=5, teacher_steps=steps, guidance=guidance)
                row[name].update(latency_s=lat["total_s"], latency_raw_s=lat["raw"]["total_s"],
                                 latency_split_s={k: lat[k] for k in ("text_s", "transformer_s", "vae_s", "other_s")})
            grids[px, name] = images
            print(f"{px} px {name}: one-object {acc['acc_one_object']:.3f} two-object {acc['acc_two_object']:.3f} "
                  f"FD {acc['fd']:.3f} (real renders: accuracy {row['classifier_real_accuracy']:.3f})", flush=True)
        row["fd_ratio_28cfg_vs_4"] = row["teacher_28_cfg"]["fd"] / row["teacher_4"]["fd"]
        result["by_resolution"][str(px)] = row
        if px == shapes.IMAGE_SIZE:
            grids["real"] = real

    # the teacher sampled scale-wise (the toy 4-step schedule, no distillation): what SwD starts from
    schedule = preset("toy_4step", patch_size=adapter.patch_size)
    scorer = ShapesScorer(samples)
    images = sample_images(adapter, prompts, seeds, schedule=schedule)
    acc, _ = scorer.score(images)
    result["teacher_scalewise_4"] = {**scores(acc), "scales": list(schedule.scales), "sigmas": list(schedule.sigmas)}
    grids["scalewise"] = images
    print(f"scale-wise 4 steps {list(schedule.scales)}: one-object {acc['acc_one_object']:.3f} "
          f"two-object {acc['acc_two_object']:.3f} FD {acc['fd']:.3f}", flush=True)
    if str(shapes.IMAGE_SIZE) in result["by_resolution"]:
        result["by_resolution"][str(shapes.IMAGE_SIZE)]["teacher_scalewise_4"] = result["teacher_scalewise_4"]

    rows = list(range(min(len(samples), 12)))
    columns = [("real 64 px", to_pil(grids["real"][rows]))] if "real" in grids else []
    columns += [(f"28 steps cfg, {px} px", to_pil(to_evaluator_size(grids[px, "teacher_28_cfg"][rows])))
                for px in args.resolutions]
    columns += [(f"4 steps, {px} px", to_pil(to_evaluator_size(grids[px, "teacher_4"][rows])))
                for px in args.resolutions]
    columns.append(("scale-wise 4 steps", to_pil(grids["scalewise"][rows])))
    title = f"{args.teacher}: " + " | ".join(
        f"{px} px 28 cfg acc1 {r['teacher_28_cfg']['acc_one_object']:.2f} "
        f"acc2 {r['teacher_28_cfg']['acc_two_object']:.2f} FD {r['teacher_28_cfg']['fd']:.2f}"
        for px, r in result["by_resolution"].items())
    grid = image_grid([[c[i] for _, c in columns] for i in range(len(rows))], [prompts[i] for i in rows],
                      [label for label, _ in columns], title=title)
    RESULTS.mkdir(parents=True, exist_ok=True)
    grid.save(RESULTS / f"{args.name}.png")
    print(f"wrote {write_result(args.name, result)} and {RESULTS / f'{args.name}.png'}")


if __name__ == "__main__":
    main()
