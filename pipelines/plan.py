"""The resolved plan of a pipeline definition, as `--dry-run` prints it, and the problems a
cluster would meet for reasons known before anything runs (`plan_problems`): `--dry-run`,
`render` and the job itself (before its first stage) refuse a definition that has any."""

from __future__ import annotations

from pipelines.schema import PipelineConfig
from pipelines.stages import AVAILABLE


def render_plan(cfg: PipelineConfig) -> str:
    schedule = cfg.schedule()
    d, r, sy, ev = cfg.distill, cfg.resources, cfg.synthesize, cfg.evaluate
    losses = d.losses
    from swd_core.adapters import FAMILIES

    guidance = FAMILIES[cfg.teacher.family].guidance_label
    out = [f"pipeline {cfg.name!r}", "", "teacher:",
           f"  {cfg.teacher.path}  (family {cfg.teacher.family}, dtype {cfg.teacher.dtype}, "
           f"patch {cfg.teacher.resolved_patch_size}, text tokens T5 {cfg.teacher.max_sequence_length})",
           "", "stages:"]
    for stage in cfg.stages:
        status = "" if stage in AVAILABLE else "  [not available in this version]"
        out.append(f"  - {stage}{status}")
    kind = "scale-wise" if schedule.is_scalewise else "full-resolution"
    out += ["", f"schedule ({kind}, {schedule.num_steps} steps):"]
    out += [f"  {line}" for line in schedule.describe()]
    out += [
        f"  scales {list(schedule.scales)}",
        f"  sigmas {[round(s, 4) for s in schedule.sigmas]}",
        "", "distill:",
        f"  mode {d.mode}"
        + (f" (LoRA rank {d.lora.rank}, alpha {d.lora.alpha or d.lora.rank})" if d.mode == "lora" else ""),
        f"  LoRA targets ({'student and fake score' if d.mode == 'lora' else 'fake score'}): "
        f"{', '.join(d.lora.targets)}",
        f"  DeepSpeed ZeRO stage {d.zero_stage}; global batch {d.batch_size}; {d.steps} generator steps; "
        f"lr {d.lr} (fake score {d.fake_lr or d.lr}); weight decay {d.weight_decay}; grad clip {d.grad_clip}",
        f"  loss = {losses.mmd.weight}·MMD({losses.mmd.kernel}, grid {list(losses.mmd.grid_range)}) "
        f"+ {losses.dmd.weight}·DMD({guidance} {losses.dmd.guidance_scale}, grid {list(losses.dmd.grid_range)}) "
        f"+ {losses.gan.weight}·GAN; features after block {losses.feature_block}",
        f"  per iteration: {d.fake_updates} fake-score update(s), then 1 generator update, at one scale (round robin)",
        f"  checkpoints and validation every {d.checkpoint_every} iterations "
        f"({d.checkpoint_every // schedule.num_steps} rounds of the {schedule.num_steps} scales); "
        "rows shuffled per epoch "
        + (f"in windows of {d.shuffle_window}" if d.shuffle_window else "(off: file order)") + f", seed {d.seed}",
        "", "resources:",
        f"  {r.num_workers} worker(s) × {r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU; "
        f"placement {r.placement_strategy}",
        *([f"  synthesize actors {sy.actors} × ({sy.cpus_per_actor} CPU, {sy.gpus_per_actor} GPU), "
           f"batch {sy.batch_size}"]
          if sy.enabled else []),
        f"  precompute actors {cfg.precompute.actors} × "
        f"({cfg.precompute.cpus_per_actor} CPU, {cfg.precompute.gpus_per_actor} GPU), "
        f"batch {cfg.precompute.batch_size}",
        f"  evaluate and preview: one task × ({ev.cpus} CPU, {ev.gpus} GPU)"
        + (f"; image metrics {', '.join(ev.metrics)} on {ev.num_prompts} prompts" if ev.metrics else ""),
        f"  serve: {cfg.serve.replicas} replica(s) × "
        f"({cfg.serve.cpus_per_replica} CPU, {cfg.serve.gpus_per_replica} GPU), "
        f"max batch {cfg.serve.max_batch_size}, port {cfg.serve.port}",
        f"  storage {cfg.run_dir}",
    ]
    out += _gpu_memory_lines(cfg)
    return "\n".join(out)


def _gpu_memory_lines(cfg: PipelineConfig) -> list[str]:
    from pipelines.gpu_memory import stage_needs

    needs = stage_needs(cfg)
    if not needs:
        return []
    have = cfg.cluster.gpu.memory
    out = ["", "GPU memory per worker, actor or replica (estimate, pipelines/gpu_memory.py; "
           + (f"checked against cluster.gpu.memory {have}):" if have else "cluster.gpu.memory not set: not checked):")]
    out += [f"  {n.stage}: ≈ {n.gb:.0f} GB ({n.how})" for n in needs]
    return out


def plan_problems(cfg: PipelineConfig) -> list[str]:
    """One line per problem, each naming the field: a GPU unit larger than a pod, a placement
    strategy the pods cannot satisfy (Ray would wait forever), a GPU stage whose estimated memory
    exceeds `cluster.gpu.memory`. The definition's schema checks the rest (batch per worker,
    Kubernetes names and quantities)."""
    from pipelines.cluster.shapes import memory_bytes, pod_problems
    from pipelines.gpu_memory import memory_problems

    out = pod_problems(cfg)
    if have := cfg.cluster.gpu.memory:
        out += memory_problems(cfg, memory_bytes(have), f"cluster.gpu.memory {have}")
    return out
