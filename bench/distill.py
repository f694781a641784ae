#!/usr/bin/env python
"""Distillation cost: seconds per generator iteration (with its fake-score updates), scale-wise
vs full-resolution, MMD-only, and peak memory of the shared-base LoRA layout vs the authors'
two-copy layout.

    python bench/distill.py                  # -> bench/results/distill.json

Each case runs in its own process (clean peak RSS) through the distill stage's own code:
`build_networks`, DeepSpeed engines (ZeRO-2, world size 1, gloo on CPU) and `train_iteration`.
Batches are random tensors with the store's shapes: the cost of an iteration does not depend on
the values, and no precompute run is needed. Ray adds nothing per iteration, so it is left out.
The timing cases use the toy teacher (toy-sd3, batch 8 per worker, the toy 4-step schedule);
the memory cases also use a larger synthetic SD3 (`--memory-model`), where one base copy is big
enough to stand out from the Python/torch baseline.

On a GPU (`--device cuda`, bf16, NCCL) every case uses one model and definition, by default an
SD3.5-Medium-wide transformer (1536 wide, random weights) at the paper's Medium scales
(`sd35_medium_4step`: 64 80 96 128 latents), and peak memory is `torch.cuda.max_memory_allocated`:

    python bench/distill.py --device cuda --batch 8 --rounds 1   # -> bench/results/distill_medium_cuda.json
    python bench/distill.py --device cuda --batch 8 --rounds 2 --text-tokens 333 --ratio-only
                                                        # SD3.5's prompt length -> distill_medium_t333_cuda.json
    python bench/distill.py --device cuda --batch 8 --rounds 2 \
        --definition pipelines/configs/sd35_medium_6step.yaml    # -> distill_sd35_medium_6step_cuda.json

`--family flux` runs the same cases at FLUX.1's width (3072 = 24 heads × 128, its RoPE axes, 16
latent channels packed 2×2) with random weights and a fraction of FLUX.1-dev's 19 double- and 38
single-stream blocks (`--model`; the result's `flux_blocks` states how many), on the FLUX.1-dev
definition's scales (FLUX's sigma grid) and its 512 T5 tokens:

    python bench/distill.py --family flux --device cuda --ratio-only   # -> distill_flux1_dev_4step_cuda.json

Every result also carries `flop_model_ratio`: the ratio the FLOPs alone allow (arithmetic from
the transformer's config, the scales and the text length, not a measurement). It shows which
schedule a published ratio can come from: Medium's 4-step scales allow no less than ~0.50 (16
text tokens) to ~0.53 (333), its 6-step scales (the authors' default) ~0.36 to ~0.39.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402

TOY = ROOT / "pipelines" / "configs" / "toy.yaml"
MEDIUM = ROOT / "pipelines" / "configs" / "sd35_medium_4step.yaml"  # --definition's default
# SD3.5-Medium's width (24 heads x 64) and latent size, half its depth, tiny text encoders
MEDIUM_LIKE = "builtin:tiny-sd3?layers=12&heads=24&head_dim=64&sample_size=128"
FLUX_DEV = ROOT / "pipelines" / "configs" / "flux1_dev_4step.yaml"  # --family flux's default definition
# FLUX.1-dev's width (24 heads x 128, RoPE axes 16/56/56) and latent size, 5 of its 19 double- and
# 10 of its 38 single-stream blocks (~3 B parameters; ≈ 40 GB at micro-batch 2 by docs/cluster.md's
# arithmetic, an estimate), tiny text encoders
FLUX_LIKE = ("builtin:tiny-flux?layers=5&single_layers=10&heads=24&head_dim=128&rope_axes=16,56,56"
             "&sample_size=128")
FLUX1_DEV_BLOCKS = {"double": 19, "single": 38}  # FLUX.1-dev's transformer config (num_layers, num_single_layers)


def _case(args) -> dict:
    """Run one case in this process and return its numbers."""
    cuda = args.device == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from pipelines.schema import load_pipeline_config
    try:
        from pipelines.stages.distill.engines import build_engines, build_networks, import_deepspeed, loss_settings
        from pipelines.stages.distill.iteration import train_iteration
        deepspeed = import_deepspeed()
    except (ModuleNotFoundError, ImportError):  # bench/host_overhead.py --baseline: the stage in one module
        import deepspeed

        from pipelines.stages.distill import build_engines, build_networks, loss_settings, train_iteration
    from swd_core.adapters import TextEmbeddings

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_pipeline_config(args.definition if args.setup == "medium" else TOY)
    d = cfg.distill.model_dump()
    d["schedule"]["scalewise"] = args.scalewise
    if args.mmd_only:
        d["losses"]["dmd"]["weight"] = 0.0
        d["losses"]["gan"]["weight"] = 0.0
    d.update(batch_size=args.batch, zero_stage=2)
    if args.fake_updates is not None:
        d["fake_updates"] = args.fake_updates
    teacher = cfg.teacher.model_dump()
    if args.model:
        teacher["path"] = args.model
        d["losses"]["feature_block"] = min(d["losses"]["feature_block"], args.model_blocks - 1)
        # builtin SD3s have CLIP encoders only; a builtin FLUX's T5 reads its tokenizer's length
        teacher["max_sequence_length"] = _builtin_text_length(args.model) if teacher["family"] == "flux" else 0
    cfg = cfg.model_copy(update={"distill": type(cfg.distill).model_validate(d),
                                 "teacher": type(cfg.teacher).model_validate(teacher)})
    schedule = cfg.schedule()
    settings = loss_settings(cfg)

    adapter, nets = build_networks(cfg, device, separate_fake_base=args.two_copies)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    student_engine, fake_engine = build_engines(cfg, nets, args.batch, bf16=cuda)

    if adapter.pipe.text_encoder is not None:
        text = adapter.encode_prompts(["a large red circle in the center"] * args.batch)
        uncond = adapter.empty_prompt()
    else:  # training loads no text encoders: random embeddings of the transformer's widths (values cost nothing)
        c = nets.base.config
        tokens = max(1, cfg.teacher.max_sequence_length)

        def random_text(n: int) -> TextEmbeddings:
            embeds = torch.randn(n, tokens, c.joint_attention_dim, generator=torch.Generator().manual_seed(n))
            pooled = torch.randn(n, c.pooled_projection_dim, generator=torch.Generator().manual_seed(n))
            return TextEmbeddings(embeds, pooled).to(device, adapter.dtype)

        text, uncond = random_text(args.batch), random_text(1)
    if args.text_tokens:  # a real encoder's prompt length: the transformer's cost depends on it, not on the values
        def padded(t: TextEmbeddings) -> TextEmbeddings:
            extra = args.text_tokens - t.prompt_embeds.shape[1]
            return TextEmbeddings(torch.nn.functional.pad(t.prompt_embeds, (0, 0, 0, extra)), t.pooled)

        text, uncond = padded(text), padded(uncond)
    flops = flop_model_ratio(nets.base.config, schedule.scales, text.prompt_embeds.shape[1], adapter.patch_size)
    rng = torch.Generator().manual_seed(0)
    latents = {s: torch.randn(args.batch, adapter.latent_channels, s, s, generator=rng).to(device)
               for s in set(schedule.scales)}

    def sync():
        if cuda:  # kernels are asynchronous: time finished work only
            torch.cuda.synchronize()

    def next_batch():
        return TextEmbeddings(text.prompt_embeds, text.pooled), latents

    def iteration(step: int):
        train_iteration(nets, student_engine, fake_engine, next_batch, schedule, settings, uncond, step,
                        cfg.distill.fake_updates, rng)

    n = schedule.num_steps
    for step in range(n):  # warm-up: one iteration per scale
        iteration(step)
    times = []
    sync()
    for step in range(n, n + n * args.rounds):  # whole rounds, so every scale counts equally
        start = time.perf_counter()
        iteration(step)
        sync()
        times.append(time.perf_counter() - start)
    ops = [count_ops(lambda: iteration(step)) for step in range(n)] if args.count_ops else None
    if args.profile:  # one more round under the profiler: where an iteration's time goes
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for step in range(n):
                iteration(step)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr, flush=True)
        if cuda:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), file=sys.stderr, flush=True)
    return {"iter_s": sum(times) / len(times), "iter_times_s": times, "device": args.device,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "ops_per_iter": ops,
            "scales": list(schedule.scales), "text_tokens": text.prompt_embeds.shape[1], "flop_model_ratio": flops,
            "fake_updates": cfg.distill.fake_updates, "batch": args.batch,
            "transformer_blocks": ({"double": nets.base.config.num_layers,
                                    "single": nets.base.config.num_single_layers}
                                   if cfg.teacher.family == "flux" else {"joint": nets.base.config.num_layers}),
            "transformer_params": sum(p.numel() for p in nets.base.parameters() if p.requires_grad is False),
            "model": cfg.teacher.path, "family": cfg.teacher.family,
            "width": nets.base.config.num_attention_heads * nets.base.config.attention_head_dim,
            "losses": {k: v for k, v in vars(settings).items() if k.endswith("weight")}}


def _builtin_text_length(model: str) -> int:
    from swd_core.tiny_models import parse_builtin

    return parse_builtin(model).text_max_length if model.startswith("builtin:") else 512


# aten ops that only re-describe memory; every other op launches work (about one GPU kernel)
VIEW_OPS = frozenset({"view", "_unsafe_view", "as_strided", "t", "transpose", "slice", "expand", "unsqueeze",
                      "squeeze", "permute", "alias", "detach", "select", "split", "split_with_sizes", "chunk",
                      "unbind", "reshape", "_reshape_alias", "lift_fresh", "empty", "empty_strided"})


def count_ops(fn) -> int:
    """How many aten ops other than views `fn()` dispatches: the eager host work a GPU waits on
    when its kernels are short. Hand-written: torch.profiler records the same ops but slows the
    call and names events, not dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket.__name__ not in VIEW_OPS
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return counter.n


def flop_model_ratio(config, scales, text_tokens: int, patch_size: int | None = None) -> float:
    """Scale-wise over full-resolution transformer FLOPs for one pass at each scale. Per joint
    block, with N image tokens, T text tokens and width d: the projections and MLP cost
    24·(N+T)·d² and attention 4·(N+T)²·d (forward; backward scales both alike). Hand-written:
    arithmetic about this model, which no library states. FLUX's single-stream blocks cost the
    same per token (qkv 3d² + MLP in 4d² + out 5d², ×2). `patch_size`: latent cells per token side
    (FLUX packs 2×2 outside its transformer, whose config says 1)."""
    d = config.num_attention_heads * config.attention_head_dim
    patch = patch_size or config.patch_size

    def block(side: int) -> float:
        tokens = (side // patch) ** 2 + text_tokens
        return 24 * tokens * d * d + 4 * tokens * tokens * d

    return sum(block(s) for s in scales) / (len(scales) * block(scales[-1]))


def run_case(name: str, extra: list[str], args, port: int, root: Path = ROOT) -> dict:
    """One case in a fresh process, with the code checked out at `root`."""
    cmd = [sys.executable, str(root / "bench" / "distill.py"), "--case", "--port", str(port),
           "--batch", str(args.batch), "--definition", str(args.definition),
           "--rounds", str(args.rounds), "--threads", str(args.threads), "--device", args.device,
           "--text-tokens", str(args.text_tokens), "--family", args.family, *extra]
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"case {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(line.removeprefix("RESULT "))
    print(f"[bench] {name}: {out['iter_s']:.3f} s/iter, peak RSS {out['peak_rss_mb']:.0f} MB"
          + (f", peak GPU {out['peak_gpu_mb']:.0f} MB" if out["peak_gpu_mb"] else ""), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="per-worker batch (default 8; --family flux: 2)")
    p.add_argument("--family", choices=["sd3", "flux"], default="sd3",
                   help="flux: every case at FLUX.1's width on the FLUX.1-dev definition (see above)")
    p.add_argument("--out", type=Path, default=None, help="the result JSON (default: bench/results/<name>.json)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds over all scales")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--memory-model", default="builtin:tiny-sd3?layers=12&heads=8&head_dim=64",
                   help="a larger SD3 for the memory comparison")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--setup", choices=["toy", "medium"], default=None,
                   help="toy: toy-sd3 timing + a memory model (cpu default); medium: every case on the "
                        "Medium-like model at the Medium scales (cuda default)")
    p.add_argument("--model", default=None,
                   help=f"teacher for every case (cuda default: {MEDIUM_LIKE}; cpu: the toy for timing)")
    p.add_argument("--definition", type=Path, default=MEDIUM,
                   help="medium setup: the pipeline definition whose schedule and losses every case uses")
    p.add_argument("--model-blocks", type=int, default=12, help="its number of blocks (caps the feature block)")
    p.add_argument("--text-tokens", type=int, default=0,
                   help="pad the prompt embeddings to this many tokens (SD3.5: 77 CLIP + 256 T5 = 333); "
                        "0: the encoders' own length")
    p.add_argument("--ratio-only", action="store_true",
                   help="medium setup: only the scale-wise and full-resolution cases")
    p.add_argument("--profile", action="store_true", help="with --case: print a torch.profiler table of one round")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29511, help=argparse.SUPPRESS)
    p.add_argument("--scalewise", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mmd-only", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--two-copies", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fake-updates", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--count-ops", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.family == "flux" and not args.case:
        args.definition = FLUX_DEV if args.definition == MEDIUM else args.definition
        args.model = args.model or FLUX_LIKE
        args.setup = "medium"
        if args.text_tokens == 0:  # FLUX.1-dev's 512 T5 tokens, the definition's length
            from pipelines.schema import load_pipeline_config

            args.text_tokens = load_pipeline_config(args.definition).teacher.max_sequence_length
        if args.model.startswith("builtin:"):  # the feature block must be a double-stream block
            from swd_core.tiny_models import parse_builtin

            args.model_blocks = parse_builtin(args.model).layers
    args.batch = args.batch or (2 if args.family == "flux" else 8)
    args.definition = args.definition.resolve()  # the cases run in their checkout's root
    if args.case:
        print("RESULT " + json.dumps(_case(args)), flush=True)
        return

    args.setup = args.setup or ("medium" if args.device == "cuda" else "toy")
    if args.setup == "medium":
        medium_cases(args)
        return
    mem = ["--model", args.memory_model, "--rounds", "1"]
    cases = {
        "scalewise": run_case("scalewise", [], args, 29511),
        "fullres": run_case("fullres", ["--scalewise", "0"], args, 29512),
        "mmd_only": run_case("mmd_only", ["--mmd-only", "1"], args, 29513),
        "memory_shared": run_case("memory_shared", mem, args, 29514),
        "memory_two_copies": run_case("memory_two_copies", mem + ["--two-copies", "1"], args, 29515),
        "toy_two_copies": run_case("toy_two_copies", ["--two-copies", "1", "--rounds", "1"], args, 29516),
    }
    cases["toy_shared"] = {"peak_rss_mb": cases["scalewise"]["peak_rss_mb"]}
    _write("distill", cases, out=args.out, flop_model_ratio=cases["scalewise"]["flop_model_ratio"],
           peak_rss_mb_shared=cases["memory_shared"]["peak_rss_mb"],
           peak_rss_mb_two_copies=cases["memory_two_copies"]["peak_rss_mb"],
           peak_rss_note=f"per worker process, LoRA mode, model {args.memory_model}; toy-sd3: "
                         f"{cases['toy_shared']['peak_rss_mb']:.0f} MB shared vs "
                         f"{cases['toy_two_copies']['peak_rss_mb']:.0f} MB two copies")


def medium_cases(args) -> None:
    """Every case on one model (SD3.5-Medium-wide by default) at the Medium scales, bf16."""
    model = ["--model", args.model or MEDIUM_LIKE, "--model-blocks", str(args.model_blocks), "--setup", "medium"]
    cases = {
        # + a round counting ops
        "scalewise": run_case("scalewise", model + ["--count-ops", str(int(not args.ratio_only))], args, 29521),
        "fullres": run_case("fullres", model + ["--scalewise", "0"], args, 29522),
    }
    if not args.ratio_only:
        cases["two_copies"] = run_case("two_copies", model + ["--two-copies", "1", "--rounds", "1"], args, 29524)
        cases["mmd_only"] = run_case("mmd_only", model + ["--mmd-only", "1"], args, 29523)
    definition = args.definition
    name = "medium" if definition == MEDIUM else definition.stem
    name += f"_t{args.text_tokens}" if args.text_tokens else ""
    extra = {}
    if args.family == "flux":
        name = definition.stem  # 512 T5 tokens is FLUX.1-dev's own length
        config = cases["scalewise"]["transformer_blocks"]
        extra["flux_blocks"] = {**config, "of_flux1_dev": FLUX1_DEV_BLOCKS,
                                "fraction": sum(config.values()) / sum(FLUX1_DEV_BLOCKS.values())}
    _write(f"distill_{name}_{args.device}", cases,
           model=args.model or MEDIUM_LIKE,
           definition=definition.relative_to(ROOT).as_posix() if definition.is_relative_to(ROOT) else str(definition),
           text_tokens=cases["scalewise"]["text_tokens"],
           flop_model_ratio=cases["scalewise"]["flop_model_ratio"],
           peak_gpu_mb_shared=cases["scalewise"]["peak_gpu_mb"],
           peak_gpu_mb_two_copies=cases["two_copies"]["peak_gpu_mb"] if "two_copies" in cases else None,
           family=args.family, width=cases["scalewise"]["width"], out=args.out, **extra)


def _write(name: str, cases: dict, out: Path | None = None, **fields) -> None:
    """The timing summary every setup reports (write_result adds the machine), plus `fields`."""
    result = {
        "command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]),
        "scalewise_iter_s": cases["scalewise"]["iter_s"],
        "fullres_iter_s": cases["fullres"]["iter_s"],
        "ratio_iter": cases["scalewise"]["iter_s"] / cases["fullres"]["iter_s"],
        "mmd_only_iter_s": cases["mmd_only"]["iter_s"] if "mmd_only" in cases else None,
        **fields,
        "cases": cases,
    }
    path = write_result(name, result, out)
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))
    print(f"[bench] wrote {path}")


if __name__ == "__main__":
    main()
