#!/usr/bin/env python
"""Recipe sweep for the toy distillation: which learning rate, fake-update count, loss mix and
LoRA rank make the 4-step scale-wise student beat the 4-step teacher, and how soon.

    python bench/recipe_sweep.py --device cuda --recipes all --seeds 0,1,2   # -> bench/results/recipe_sweep.json
    python bench/recipe_sweep.py --recipes default,lr3e-4 --steps 40 --eval-every 20   # a CPU smoke run

Every recipe is a set of overrides of the toy definition's `distill` section (RECIPES below) and
trains, once per seed of `--seeds` (`distill.seed`: the adapters' initialisation, the noise and
the data order), in its own process on one device: the distill stage's own `build_networks`,
`train_iteration` and data order (`worker_batches`, one worker over all rows), with torch AdamW and
gradient clipping standing in for the DeepSpeed engines (what DeepSpeed does at world size 1).
The data are the toy definition's shapes rows, encoded once by the precompute stage's own
`Encoder` and round-tripped through the store's storage dtype. Every `--eval-every` iterations
(rounded up to a multiple of the schedule's step count, as the stage's checkpoints are) the
student is scored as the evaluate stage scores it: 4-step
scale-wise samples for the first `--prompts` held-out prompts (seeds 0..n-1), prompt accuracy and
FD against real renders of the same prompts. The teacher at 4 steps is scored once on the same
prompts, as the bar to beat: with its own Euler sampler (the evaluate stage's `teacher_4`) and with
the student's sampler at full resolution (x0 jumps at the SwD sigmas).

`<out>.jsonl` gets one line per evaluation, written as each recipe's process ends, so a sweep cut
short keeps the recipes that finished. The JSON's `summary` gives, per recipe and evaluated step,
the mean, standard deviation, min and max over the seeds, and the same for the mean over the
evaluated steps of each seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, write_result  # noqa: E402

TOY = ROOT / "pipelines" / "configs" / "toy.yaml"

# name -> overrides of `distill` (dotted keys reach into nested sections)
RECIPES: dict[str, dict] = {
    "default": {},
    "lr3e-4": {"lr": 3e-4},
    "lr1e-3": {"lr": 1e-3},
    "lr3e-4_fake2": {"lr": 3e-4, "fake_updates": 2},
    "lr1e-3_fake1": {"lr": 1e-3, "fake_updates": 1},
    "lr3e-4_rank64": {"lr": 3e-4, "lora.rank": 64},
    "lr3e-4_no_gan": {"lr": 3e-4, "losses.gan.weight": 0.0},
    "lr3e-4_mmd_only": {"lr": 3e-4, "losses.dmd.weight": 0.0, "losses.gan.weight": 0.0},
    "lr3e-4_no_mmd": {"lr": 3e-4, "losses.mmd.weight": 0.0},
    "lr3e-4_gan5e-2": {"lr": 3e-4, "losses.gan.weight": 5e-2},
    "lr3e-4_cfg2": {"lr": 3e-4, "losses.dmd.guidance_scale": 2.0},
    "lr3e-4_fakelr1e-3": {"lr": 3e-4, "fake_lr": 1e-3},
    "lr1e-3_fake2_cfg2.5": {"lr": 1e-3, "fake_updates": 2, "losses.dmd.guidance_scale": 2.5},
    "lr1e-3_fake1_cfg2.5": {"lr": 1e-3, "fake_updates": 1, "losses.dmd.guidance_scale": 2.5},
    "lr3e-4_fake2_cfg2.5": {"lr": 3e-4, "fake_updates": 2, "losses.dmd.guidance_scale": 2.5},
    "lr1e-3_fake2_cfg2.5_rank64": {"lr": 1e-3, "fake_updates": 2, "losses.dmd.guidance_scale": 2.5, "lora.rank": 64},
    "lr1e-3_fake2_cfg2.5_decay": {"lr": 1e-3, "fake_updates": 2, "losses.dmd.guidance_scale": 2.5,
                                  "lr_decay_fraction": 0.5},
    "lr1e-3_fake2_cfg1": {"lr": 1e-3, "fake_updates": 2, "losses.dmd.guidance_scale": 1.0},
    "lr1e-3_mmd_only": {"lr": 1e-3, "losses.dmd.weight": 0.0, "losses.gan.weight": 0.0},
    "lr1e-3_fake2_cfg2.5_ema0.98": {"lr": 1e-3, "fake_updates": 2, "losses.dmd.guidance_scale": 2.5,
                                    "ema_decay": 0.98},
    "lr1e-3_fake2_cfg2.5_ema0.99": {"lr": 1e-3, "fake_updates": 2, "losses.dmd.guidance_scale": 2.5,
                                    "ema_decay": 0.99},
    # The toy definition's own recipe (lr 1e-3, 2 fake updates, DMD CFG 2.5) with one change each.
    # DMD only where the single-resolution toy teacher is in its training distribution
    "lr1e-3_fake2_cfg2.5_dmd16": {"losses.dmd.min_scale": 16},
    "lr1e-3_fake2_cfg2.5_dmd12": {"losses.dmd.min_scale": 12},
    "lr1e-3_fake2_cfg4.5_dmd16": {"losses.dmd.guidance_scale": 4.5, "losses.dmd.min_scale": 16},
    # what keeps DMD from swinging FD: a smaller DMD weight, a faster fake score, no GAN
    "lr1e-3_fake2_cfg2.5_dmd0.25": {"losses.dmd.weight": 0.25},
    "lr1e-3_fake2_cfg2.5_fakelr3e-3": {"fake_lr": 3e-3},
    "lr1e-3_fake5_cfg2.5": {"fake_updates": 5},
    "lr1e-3_fake2_cfg2.5_nogan": {"losses.gan.weight": 0.0},
    # against DMD's mode collapse (the background colour): a 10x GAN on real data, with a 4x MMD
    "lr1e-3_fake2_cfg2.5_gan5e-2": {"losses.gan.weight": 5e-2},
    "lr1e-3_fake2_cfg2.5_gan5e-2_mmd4": {"losses.gan.weight": 5e-2, "losses.mmd.weight": 4.0},
    # a weaker guidance in DMD: its target moves from CFG's sharpened modes toward the data
    "lr1e-3_fake2_cfg1.5": {"losses.dmd.guidance_scale": 1.5},
    # with the every-scale teacher the untrained student (the teacher sampled scale-wise) already
    # beats the 4-step teacher and lr 1e-3 swings FD around it: a gentler student against a critic
    # that keeps pace (two time-scale learning rates, as DMD2 runs its fake score)
    "lr1e-4_fakelr1e-3": {"lr": 1e-4, "fake_lr": 1e-3},
}


def recipe_config(name: str, steps: int | None = None, seed: int | None = None):
    """The toy definition with recipe `name` applied (and `steps`, which sets the lr decay's length,
    and `distill.seed`)."""
    from pipelines.schema import load_pipeline_config

    cfg = load_pipeline_config(TOY)
    d = cfg.distill.model_dump()
    if steps is not None:
        d["steps"] = steps
        d["checkpoint_every"] = steps  # the sweep evaluates on its own points (eval_steps)
    if seed is not None:
        d["seed"] = seed
    for key, value in RECIPES[name].items():
        node = d
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"recipe {name}: distill has no field {key!r}")
        node[leaf] = value
    return cfg.model_copy(update={"distill": type(cfg.distill).model_validate(d)})


def eval_steps(steps: int, every: int, num_steps: int) -> list[int]:
    """Every `every` iterations and the last, each rounded up to a multiple of the schedule's step
    count (as the stage's checkpoints are: after a full round of scales), capped at `steps`."""
    points = {min(steps, -(-k // num_steps) * num_steps) for k in range(every, steps + 1, every)} | {steps}
    return sorted(points)


class _AllRows:
    """The in-memory rows as one block of row numbers, read like a worker's dataset shard."""

    def __init__(self, rows: int):
        self.rows = rows

    def iter_batches(self, **_):
        import numpy as np

        return iter([{"row": np.arange(self.rows)}])


class _Indices:
    def decode(self, batch):
        return batch


def summarize(records: list[dict]) -> dict:
    """Per recipe: mean, std, min and max over seeds of FD and prompt accuracy at each evaluated
    step, and of each seed's mean over the evaluated steps after step 0."""
    import statistics

    def spread(values):
        return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values)}

    out = {}
    for name in dict.fromkeys(r["recipe"] for r in records if "step" in r):
        runs = [r for r in records if r.get("recipe") == name and "step" in r]
        seeds = sorted({r["seed"] for r in runs})
        by_step = {}
        for step in sorted({r["step"] for r in runs}):
            at = [r for r in runs if r["step"] == step]
            by_step[str(step)] = {"fd": spread([r["fd"] for r in at]),
                                  "prompt_accuracy": spread([r["prompt_accuracy"] for r in at])}
        per_seed = {key: [statistics.fmean(r[key] for r in runs if r["seed"] == s and r["step"] > 0) for s in seeds
                          if any(r["seed"] == s and r["step"] > 0 for r in runs)] for key in ("fd", "prompt_accuracy")}
        out[name] = {"seeds": seeds, "by_step": by_step,
                     "mean_over_steps": {k: spread(v) for k, v in per_seed.items() if v}}
    return out


class PlainEngine:
    """What `train_iteration` asks of a DeepSpeed engine, in one process: backward, and a step
    with gradient clipping (DeepSpeed's `gradient_clipping`) and AdamW."""

    def __init__(self, params, lr: float, betas, weight_decay: float, clip: float, schedule=None):
        import torch

        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self.scheduler = schedule(self.opt) if schedule else None  # the distill stage's lr_schedule
        self.clip, self.norm = clip, None

    def backward(self, loss):
        loss.backward()

    def step(self):
        import torch

        self.norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip).detach()  # read once per iteration
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def get_global_grad_norm(self):
        return self.norm


def encode_rows(cfg, rows: int, device: str, path: Path) -> None:
    """The definition's first `rows` shapes rows as the store would hold them (the precompute
    stage's reading and `Encoder`, its storage dtype round trip), saved as one tensor file."""
    import torch

    from pipelines import sources, store
    from pipelines.stages.precompute import Encoder, EncodeSpec, text_shapes, values_manifest

    src = cfg.data.sources[0]
    if src.format != "shapes":
        raise ValueError("the recipe sweep trains on the toy definition's shapes rows")
    spec = EncodeSpec.from_config(cfg)
    encoder = Encoder(spec)
    encoder.adapter.pipe.to(device)
    text = text_shapes(spec)
    manifest = values_manifest(cfg, text)
    cols: dict[str, list] = {}
    for batch in sources.iter_batches(sources.read_tasks([src.model_copy(update={"limit": rows})], cfg.resources),
                                      cfg.resources):
        encoded = store.decode_numpy(encoder(batch).to_pydict(), manifest)
        for k, v in encoded.items():
            if k not in ("sample_id", "caption"):
                cols.setdefault(k, []).append(torch.from_numpy(v))
    data = {k: torch.cat(v) for k, v in cols.items()}
    data["uncond_prompt_embeds"], data["uncond_pooled"] = text["prompt_embeds"], text["pooled"]
    torch.save(data, path)


def evaluate(adapter, scorer, prompts, role=None, **sampling) -> dict:
    """Scores of images for `prompts` (seeds 0..n-1); `sampling` goes to `sample_images`."""
    from contextlib import nullcontext

    from swd_core.evaluate_model import sample_images
    from swd_core.lora import use_role

    start = time.perf_counter()
    with use_role(adapter.transformer, role) if role else nullcontext():
        images = sample_images(adapter, prompts, list(range(len(prompts))), **sampling)
    scores, _ = scorer.score(images)
    return {"prompt_accuracy": scores["prompt_accuracy"], "acc_one_object": scores.get("acc_one_object"),
            "acc_two_object": scores.get("acc_two_object"), "per_attribute": scores.get("per_attribute"),
            "fd": scores["fd"], "eval_s": time.perf_counter() - start}


def run_recipe(args) -> None:
    """One recipe, in this process: train, evaluating every `eval_every` steps; JSON lines to stdout."""
    import torch

    from pipelines.sharding import WorkerRows
    from pipelines.stages.distill.data import worker_batches
    from pipelines.stages.distill.engines import (
        averaged_student,
        build_networks,
        loss_settings,
        lr_schedule,
        student_ema,
    )
    from pipelines.stages.distill.iteration import train_iteration
    from swd_core.adapters import TextEmbeddings
    from swd_core.evaluate_model import ShapesScorer
    from swd_core.lora import STUDENT
    from swd_core.toy import shapes

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    cfg = recipe_config(args.recipe, args.steps, args.seed)
    d = cfg.distill
    schedule, settings = cfg.schedule(), loss_settings(cfg)
    adapter, nets = build_networks(cfg, device)
    student_engine = PlainEngine(nets.student_parameters(), d.lr, d.betas, d.weight_decay, d.grad_clip,
                                 lr_schedule(cfg, updates_per_step=1))
    fake_engine = PlainEngine(nets.fake_parameters(), d.fake_lr or d.lr, d.betas, d.weight_decay, d.grad_clip,
                              lr_schedule(cfg, updates_per_step=d.fake_updates))
    ema, student_params = student_ema(cfg, nets), nets.student_parameters()

    data = torch.load(args.data, weights_only=True)
    uncond = TextEmbeddings(data.pop("uncond_prompt_embeds"), data.pop("uncond_pooled")).to(device, adapter.dtype)
    data = {k: v.to(device) for k, v in data.items()}
    rows = len(data["prompt_embeds"])
    order = worker_batches(_AllRows(rows), WorkerRows(("memory",), 0, rows), _Indices(), d.batch_size, 0, 0,
                     d.shuffle_window, d.seed)

    def next_batch():
        _, batch = next(order)
        idx = torch.from_numpy(batch["row"]).to(device)
        text = TextEmbeddings(data["prompt_embeds"][idx], data["pooled_prompt_embeds"][idx]).to(device, adapter.dtype)
        return text, {s: data[f"latents_{s}"][idx] for s in set(schedule.scales)}

    samples = shapes.held_out_prompts()[:args.prompts]
    prompts = [s.caption for s in samples]
    scorer = ShapesScorer(samples)

    def emit(**record):
        print("RESULT " + json.dumps({"recipe": args.recipe, "seed": args.seed, "overrides": RECIPES[args.recipe],
                                      **record}), flush=True)

    evals = eval_steps(args.steps, args.eval_every, schedule.num_steps)
    emit(step=0, **evaluate(adapter, scorer, prompts, STUDENT, schedule=schedule))
    train_s, started = 0.0, time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        rng = torch.Generator().manual_seed(d.seed * 1_000_003 + step)
        _, terms = train_iteration(nets, student_engine, fake_engine, next_batch, schedule, settings, uncond, step,
                                   d.fake_updates, rng)
        if ema is not None:
            ema.step(student_params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s += time.perf_counter() - t0
        out_of_time = time.perf_counter() - started > args.time_limit
        if step + 1 in evals or out_of_time:
            with averaged_student(ema, student_params):  # the weights the stage would export
                scores = evaluate(adapter, scorer, prompts, STUDENT, schedule=schedule)
            emit(step=step + 1, train_iter_s=train_s / (step + 1), terms=terms, **scores)
        if out_of_time:
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="all", help=f"comma-separated names or 'all': {', '.join(RECIPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=None, help="shapes rows (default: the toy definition's limit)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--prompts", type=int, default=192,
                   help="held-out prompts per evaluation (the toy evaluate stage's count)")
    p.add_argument("--jobs", type=int, default=1, help="recipes trained at once (each its own process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per recipe process")
    p.add_argument("--time-limit", type=float, default=1e9,
                   help="seconds of training per recipe before a last evaluation")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/recipe_sweep.json)")
    p.add_argument("--seeds", default="0", help="comma-separated distill.seed values; every recipe runs once per seed")
    p.add_argument("--from-lines", action="store_true",
                   help="train nothing: rebuild the result JSON from <out>.jsonl "
                        "(the evaluations of a sweep cut short)")
    p.add_argument("--recipe", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.recipe:
        run_recipe(args)
        return

    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "recipe_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = out.with_suffix(".jsonl")
    if args.from_lines:
        logged = [json.loads(ln) for ln in lines.read_text().splitlines() if ln.strip()]
        bars = {r.pop("recipe"): r for r in logged if r.get("recipe") in ("teacher_4", "teacher_4_x0_jumps")}
        records = [r for r in logged if "seed" in r]
        done = list(dict.fromkeys(r["recipe"] for r in records))
        write_sweep(out, args, args.rows or recipe_config("default").data.sources[0].limit, bars["teacher_4"],
                    bars["teacher_4_x0_jumps"], done, sorted({r["seed"] for r in records}), records,
                    {"from_lines": str(lines.resolve().relative_to(ROOT)
                                       if ROOT in lines.resolve().parents else lines),
                     "runs_finished": {n: sorted({r["seed"] for r in records if r["recipe"] == n})
                                       for n in done}})
        return
    cfg = recipe_config("default", args.steps)  # refuses --steps that are not whole rounds of scales, before any work
    rows = args.rows or cfg.data.sources[0].limit
    data = Path(tempfile.gettempdir()) / f"recipe_sweep_{os.getpid()}.pt"
    t0 = time.perf_counter()
    encode_rows(cfg, rows, args.device, data)
    print(f"[sweep] encoded {rows} rows in {time.perf_counter() - t0:.1f} s", flush=True)

    # the bar: the teacher at 4 steps on the same prompts and seeds
    from swd_core.adapters import load_adapter
    from swd_core.evaluate_model import ShapesScorer
    from swd_core.toy import shapes

    t = cfg.teacher
    teacher = load_adapter(t.family, t.path, dtype=t.dtype, device=args.device,
                           max_sequence_length=t.max_sequence_length)
    samples = shapes.held_out_prompts()[:args.prompts]
    scorer = ShapesScorer(samples)
    # as the evaluate stage samples "teacher 4 steps": its own Euler sampler, 4 steps, no CFG
    steps = cfg.schedule().num_steps
    bar = evaluate(teacher, scorer, [s.caption for s in samples], teacher_steps=steps, guidance=0.0)
    # and through the student's sampler at full resolution (x0 jumps at the SwD sigmas)
    bar_x0 = evaluate(teacher, scorer, [s.caption for s in samples], schedule=cfg.schedule().full_resolution())
    bars = ((f"teacher {steps} steps (Euler)", bar), (f"teacher {steps} steps (x0 jumps, SwD sigmas)", bar_x0))
    for label, b in bars:
        print(f"[sweep] {label}: accuracy {b['prompt_accuracy']:.3f}, FD {b['fd']:.3f}", flush=True)
    del teacher

    records, procs, queue = [], {}, [(n, seed) for n in names for seed in seeds]
    with lines.open("w") as log:
        log.write(json.dumps({"recipe": "teacher_4", **bar}) + "\n")
        log.write(json.dumps({"recipe": "teacher_4_x0_jumps", **bar_x0}) + "\n")
        while queue or procs:
            while queue and len(procs) < args.jobs:
                name, seed = queue.pop(0)
                cmd = [sys.executable, __file__, "--recipe", name, "--seed", str(seed), "--data", str(data),
                       "--device", args.device, "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                       "--prompts", str(args.prompts), "--threads", str(args.threads),
                       "--time-limit", str(args.time_limit)]
                procs[name, seed] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                     cwd=ROOT)
            for (name, seed), proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                output = proc.stdout.read()
                got = [json.loads(ln.removeprefix("RESULT "))
                       for ln in output.splitlines() if ln.startswith("RESULT ")]
                for r in got:
                    log.write(json.dumps(r) + "\n")
                    speed = f", {r['train_iter_s']:.3f} s/it" if "train_iter_s" in r else ""
                    print(f"[sweep] {name} seed {seed} step {r['step']}: accuracy {r['prompt_accuracy']:.3f}, "
                          f"FD {r['fd']:.3f}{speed}", flush=True)
                log.flush()
                records.extend(got)
                if proc.returncode != 0:
                    print(f"[sweep] {name} seed {seed} FAILED (exit {proc.returncode}):\n{output[-3000:]}", flush=True)
                    records.append({"recipe": name, "seed": seed, "failed": output[-2000:]})
                del procs[name, seed]
            time.sleep(1)
    data.unlink(missing_ok=True)
    write_sweep(out, args, rows, bar, bar_x0, names, seeds, records)


def write_sweep(out: Path, args, rows: int, bar: dict, bar_x0: dict, names: list[str], seeds: list[int],
                records: list[dict], extra: dict | None = None) -> None:
    result = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]),
              "machine": machine_info(), "device": args.device, "rows": rows, "prompts": args.prompts,
              "teacher_4": bar, "teacher_4_x0_jumps": bar_x0, "recipes": {n: RECIPES[n] for n in names},
              "seeds": seeds, "summary": summarize(records), "evaluations": records, **(extra or {})}
    if args.out is None:
        out = write_result(out.stem, result)
    else:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[sweep] wrote {out}")


if __name__ == "__main__":
    main()
