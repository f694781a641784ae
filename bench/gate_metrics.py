"""Do the teacher-only gate metrics rank students as the toy's classifier metrics do?

The promotion gate of scheduled retraining must work for teachers without a classifier, so it
offers `teacher_denoise` and `teacher_fd` (swd_core/teacher_metrics.py). This bench trains the
`make run` definition once, exporting the student at every checkpoint (students of every quality
along one run, as validation sees them), scores every student with all four gate metrics on the
same held-out prompts and seeds, and reports Spearman rank correlations of each teacher-only
metric with the toy's FD and with its prompt accuracy (negated, so +1 means the same ranking).

    python bench/gate_metrics.py                      # ~35 min on 2 cores
    python bench/gate_metrics.py --students DIR ...   # score existing exports (merged/ folders)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, write_result  # noqa: E402

METRICS = ("fd", "prompt_accuracy", "teacher_denoise", "teacher_fd", "teacher_alignment",
           "teacher_cfg_denoise")


def train_students(work: Path, config: Path, seed: int | None = None) -> list[Path]:
    d = yaml.safe_load(config.read_text())
    d["name"] = "gate-bench"
    if seed is not None:
        d["distill"]["seed"] = seed
    d["stages"] = ["precompute", "distill"]
    d["distill"]["export_at_checkpoints"] = True
    d["distill"]["validation"] = {"num_prompts": 0}  # every checkpoint's student, not the chosen one
    d["resources"]["storage"] = str(work / "runs")
    path = work / "gate-bench.yaml"
    path.write_text(yaml.safe_dump(d))
    subprocess.run([sys.executable, "pipelines/distill.py", "--config", str(path)], cwd=ROOT, check=True)
    student = work / "runs" / "gate-bench" / "student"
    steps = sorted(student.glob("step_*"), key=lambda p: int(p.name.removeprefix("step_")))
    return [p / "merged" for p in steps] + [student / "merged"]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# --- candidate teacher-only metrics, explored on cached samples ---------------------------------
# One probe per sample set: the teacher's velocity on the samples noised to each of SIGMAS with
# DRAWS fixed noise draws, under the sample's prompt, the empty prompt and another sample's prompt,
# plus the image tokens of BLOCKS (mean-pooled, first draw). Every candidate below is a reduction
# of these, so trying one costs no extra teacher pass.
SIGMAS = (0.3, 0.45, 0.6, 0.75)
DRAWS = 1  # --draws
GUIDANCE = 4.5


def _noise(shape, seeds, draw):
    from swd_core.teacher_metrics import NOISE_OFFSET

    out = []
    for s in seeds:  # draw d of image i: the (d+1)-th tensor of its own generator
        g = torch.Generator().manual_seed(int(s) + NOISE_OFFSET)
        for _ in range(draw + 1):
            e = torch.randn(shape, generator=g)
        out.append(e)
    return torch.stack(out)


@torch.no_grad()
def probe(teacher, latents, prompts, seeds, blocks, batch_size=64) -> dict:
    n, S = len(latents), len(SIGMAS)
    other = [prompts[(i + n // 2) % n] for i in range(n)]  # a fixed derangement of the prompts
    err = {k: torch.zeros(n, S, DRAWS) for k in ("c", "u", "o", "cfg", "gap")}
    feats = {b: [] for b in blocks}
    empty = teacher.empty_prompt()
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = latents[start:stop].float()
        b = stop - start
        from swd_core.adapters.base import TextEmbeddings

        text = TextEmbeddings.cat([teacher.encode_prompts(list(prompts[start:stop])), empty.expand(b),
                                   teacher.encode_prompts(list(other[start:stop]))])
        per_block = {bl: [] for bl in blocks}
        for d in range(DRAWS):
            eps = _noise(tuple(x.shape[1:]), seeds[start:stop], d)
            for j, sigma in enumerate(SIGMAS):
                noisy = (1 - sigma) * x + sigma * eps
                v, taps = teacher.velocity(torch.cat([noisy] * 3), sigma, text,
                                           feature_blocks=blocks if d == 0 else ())
                vc, vu, vo = v.float().chunk(3)
                target = eps - x

                def e(w):
                    return ((w - target) ** 2).flatten(1).mean(1)

                err["c"][start:stop, j, d], err["u"][start:stop, j, d] = e(vc), e(vu)
                err["o"][start:stop, j, d] = e(vo)
                err["cfg"][start:stop, j, d] = e(vu + GUIDANCE * (vc - vu))
                err["gap"][start:stop, j, d] = ((vc - vu) ** 2).flatten(1).mean(1)  # how far the prompt moves v
                for bl in (blocks if d == 0 else ()):
                    per_block[bl].append(taps[bl][:b].float().mean(1))  # conditional pass, image tokens
        for bl in blocks:
            feats[bl].append(torch.stack(per_block[bl], 1))  # (b, S, width)
    return {"err": err, "feats": {bl: torch.cat(f) for bl, f in feats.items()}}


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (KID), features standardized by b."""
    mu, sd = b.mean(0), b.std(0) + 1e-6
    a, b = ((a - mu) / sd).double(), ((b - mu) / sd).double()
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    m, n = len(a), len(b)
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - kaa.diag().sum()) / (m * (m - 1)) + (kbb.sum() - kbb.diag().sum()) / (n * (n - 1))
                 - 2 * kab.mean())


def pca_fd(a: torch.Tensor, b: torch.Tensor, k: int = 32) -> float:
    """FD after a PCA to k dims fitted on b (standardized by b)."""
    from swd_core.frechet import frechet_distance

    mu, sd = b.mean(0), b.std(0) + 1e-6
    a, b = (a - mu) / sd, (b - mu) / sd
    _, _, vt = torch.linalg.svd(b.double(), full_matrices=False)
    basis = vt[:k].T.float()
    return frechet_distance(a @ basis, b @ basis)


SUBSETS = {"lo": (0, 1), "mid": (1, 2), "hi": (2, 3), "all": (0, 1, 2, 3)}


def explore(pr: dict, ref: dict, latents, ref_latents, images, ref_images) -> dict[str, tuple[float, str]]:
    """{candidate: (value, 'min' | 'max')}"""
    e = pr["err"]
    out = {}
    for name, idx in SUBSETS.items():
        c, u, o, g = (e[k][:, list(idx)] for k in ("c", "u", "o", "cfg"))
        out[f"denoise_{name}"] = (float(c.mean()), "min")
        out[f"align_{name}"] = (float((u - c).mean()), "max")
        out[f"align_rel_{name}"] = (float(((u - c) / u).mean()), "max")
        out[f"contrast_{name}"] = (float((o - c).mean()), "max")
        out[f"dc_acc_{name}"] = (float((c < o).float().mean()), "max")
        out[f"cfg_err_{name}"] = (float(g.mean()), "min")
        out[f"gap_{name}"] = (float(e["gap"][:, list(idx)].mean()), "max")
    blocks = sorted(pr["feats"])
    for name, idx in SUBSETS.items():
        for bsel in ("mid", "all"):
            bl = [blocks[len(blocks) // 2]] if bsel == "mid" else blocks
            f = torch.cat([pr["feats"][b][:, list(idx)].flatten(1) for b in bl], 1)
            r = torch.cat([ref["feats"][b][:, list(idx)].flatten(1) for b in bl], 1)
            out[f"kid_{name}_{bsel}"] = (kid(f, r), "min")
            out[f"pcafd_{name}_{bsel}"] = (pca_fd(f, r), "min")
    out["kid_latent"] = (kid(latents.flatten(1).float(), ref_latents.flatten(1).float()), "min")

    def small(im):
        return torch.nn.functional.interpolate(im.float(), size=(16, 16), mode="area").flatten(1)

    out["kid_pixels16"] = (kid(small(images), small(ref_images)), "min")
    out["pcafd_pixels16"] = (pca_fd(small(images), small(ref_images)), "min")
    return out


def cached(path: Path | None, make):
    if path is not None and path.exists():
        return torch.load(path, weights_only=True)
    value = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, path)
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "pipelines/configs/toy.yaml"))
    p.add_argument("--students", nargs="*", help="exported students (merged/ folders) instead of training")
    p.add_argument("--prompts", type=int, default=192)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--raw-latents", action="store_true",
                   help="teacher metrics on the sampler's latents, not re-encoded from the images "
                        "(gate.reencode false)")
    p.add_argument("--name", default="gate_metrics")
    p.add_argument("--seed", type=int, help="distill.seed of the training run (default: the config's)")
    p.add_argument("--work", help="where the training run and its exports go (default: a temporary folder)")
    p.add_argument("--train-only", action="store_true", help="train and export, score later with --students")
    p.add_argument("--metrics", nargs="*", default=list(METRICS), help="gate metrics to score")
    p.add_argument("--explore", action="store_true", help="also the candidate metrics of `explore`")
    p.add_argument("--cache", help="folder for the teacher's reference samples; students' samples are "
                                   "cached beside their merged/ folder (samples are deterministic)")
    p.add_argument("--draws", type=int, default=DRAWS, help="noise draws per sigma of the explored candidates")
    args = p.parse_args(argv)
    globals()["DRAWS"] = args.draws
    start = time.time()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="swd-gate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = [Path(s) for s in args.students] if args.students else train_students(work, Path(args.config), args.seed)
    train_s = time.time() - start
    if args.train_only:
        print("\n".join(map(str, folders)))
        return 0

    from pipelines.retraining.gate import Gate
    from pipelines.schema import parse_pipeline_config

    torch.set_grad_enabled(False)
    d = yaml.safe_load(Path(args.config).read_text())
    metrics = list(dict.fromkeys(["fd", "prompt_accuracy", *args.metrics]))
    d["retrain"] = {"gate": {"num_prompts": args.prompts, "sigma": args.sigma, "batch_size": 64,
                             "reencode": not args.raw_latents,
                             "metrics": [{"name": m} for m in metrics]}}
    gate = Gate(parse_pipeline_config(d))
    tag = f"n{args.prompts}_s{gate.g.seed}"
    cache = Path(args.cache) if args.cache else None
    teacher = gate.teacher()
    ref_latents = cached(cache / f"reference_{tag}.pt" if cache else None, gate.reference_latents)
    gate._reference_latents = ref_latents
    blocks = tuple(range(1, teacher.num_blocks, 2))
    ref = ref_images = None
    if args.explore:
        ref = probe(teacher, ref_latents, gate.prompts, gate.seeds, blocks)
        ref_images = torch.cat([teacher.decode_latents(ref_latents[i:i + 64]).float()
                                for i in range(0, len(ref_latents), 64)])
    from pipelines.schema import GateMetric

    rows, directions = [], {m: GateMetric(name=m).resolved_direction for m in metrics}
    for folder in folders:
        t = time.time()
        latents, images = cached(folder.parent / f"gate_samples_{tag}.pt" if cache else None,
                                 lambda: gate.sample(str(folder)))
        scored = dict(gate.score_samples(latents, images).metrics)
        if args.explore:
            for k, (v, direction) in explore(probe(teacher, latents, gate.prompts, gate.seeds, blocks), ref,
                                             latents, ref_latents, images, ref_images).items():
                scored[k], directions[k] = v, direction
        step = folder.parent.name.removeprefix("step_") if folder.parent.name.startswith("step_") else "final"
        rows.append({"student": str(folder), "step": step, **scored, "seconds": time.time() - t})
        print(f"{step:>6}: " + "  ".join(f"{m} {scored[m]:.4f}" for m in metrics), flush=True)
    col = {m: [r[m] for r in rows] for m in directions}
    neg_acc = [-a for a in col["prompt_accuracy"]]
    # oriented so that +1 means "ranks students as the toy's metric does" whatever the direction
    oriented = {m: [v if directions[m] == "min" else -v for v in col[m]] for m in directions}
    agreement = {m: {"vs_fd": spearman(oriented[m], col["fd"]), "vs_neg_accuracy": spearman(oriented[m], neg_acc)}
                 for m in directions if m not in ("fd", "prompt_accuracy")}
    result = {
        "command": " ".join(["python", "bench/gate_metrics.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "config": args.config, "n_prompts": args.prompts, "sigma": args.sigma,
        "reencode": not args.raw_latents,
        "distill_seed": args.seed, "n_students": len(rows), "directions": directions,
        "fd_vs_neg_accuracy": spearman(col["fd"], neg_acc),  # how well the toy's own two agree
        "agreement": agreement,
        "rows": rows, "train_seconds": train_s, "seconds": time.time() - start,
    }
    if args.explore:
        result["explore"] = {"sigmas": SIGMAS, "draws": DRAWS, "blocks": blocks, "guidance": GUIDANCE,
                             "subsets": SUBSETS}
    best = sorted(agreement.items(), key=lambda kv: -min(kv[1].values()))
    print("fd_vs_neg_accuracy", round(result["fd_vs_neg_accuracy"], 3))
    for m, a in best:
        print(f"{m:>24}  vs fd {a['vs_fd']:+.3f}  vs -acc {a['vs_neg_accuracy']:+.3f}")
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
