"""Distill stage: Ray Train + DeepSpeed ZeRO, scale-wise DMD + MMD + GAN (DESIGN.md §2, §4).

The driver (`run`) builds all Ray wiring in one place: the dataset from the precomputed store,
`ScalingConfig`, `RunConfig` (storage local or s3://, `FailureConfig`), and a `TorchTrainer`.
Each worker runs `train_loop_per_worker`: build the networks, wrap student and fake score in
DeepSpeed engines, then the training loop, which reads top to bottom: round-robin scale,
fake-score updates, student pass, generator loss, step, log, checkpoint.

Layouts (distill.mode):
- "lora": one frozen base per worker carries the student and fake adapters (teacher = adapters
  off). Both engines hold only adapter (+ GAN head) parameters.
- "full": the student is its own transformer, sharded by the student engine under the
  definition's ZeRO stage (3 for large models); the teacher base carries the fake adapter.
The fake engine runs at ZeRO ≤ 2: its module holds the frozen base the teacher also uses.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from pipelines.schema import PipelineConfig

CKPT_TAG = "ckpt"  # DeepSpeed checkpoint tag inside each Ray checkpoint
EMA_FILE = "student_ema.pt"  # the student's weight average (distill.ema_decay), beside state.json
RECORD_FILE = "validation.json"  # in the export: the chosen step and every score (distill.validation)


# ----------------------------------------------------------------------------------------------
# worker side


def deepspeed_config(cfg: PipelineConfig, lr: float, zero_stage: int, micro_batch: int, bf16: bool) -> dict:
    d = cfg.distill
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": d.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        # torch's AdamW (no fused-op JIT build); DeepSpeed wraps it for ZeRO partitioning.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(d.betas), "weight_decay": d.weight_decay,
                                                  "torch_adam": True}},
        # every node writes its own shards into its local checkpoint dir; Ray merges them in storage
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 10**9,
    }


def loss_settings(cfg: PipelineConfig):
    from swd_core.training import LossSettings

    losses = cfg.distill.losses
    return LossSettings(
        feature_block=losses.feature_block,
        mmd_weight=losses.mmd.weight, mmd_kernel=losses.mmd.kernel, mmd_c=losses.mmd.c,
        rbf_bandwidth=losses.mmd.rbf_bandwidth, mmd_range=tuple(losses.mmd.grid_range),
        dmd_weight=losses.dmd.weight, guidance_scale=losses.dmd.guidance_scale, dmd_range=tuple(losses.dmd.grid_range),
        dmd_min_scale=losses.dmd.min_scale,
        gan_weight=losses.gan.weight, discriminator_weight=losses.gan.discriminator_weight,
    )


def build_networks(cfg: PipelineConfig, device: torch.device, separate_fake_base: bool = False):
    """Teacher pipeline + adapters + GAN head on `device`; returns (adapter, Networks).
    `separate_fake_base` reproduces the authors' two-copy layout (for bench/distill.py only)."""
    from swd_core.adapters import load_adapter
    from swd_core.gan_head import GANHead
    from swd_core.lora import FAKE, STUDENT, add_swd_adapters
    from swd_core.training import Networks

    t, d = cfg.teacher, cfg.distill
    adapter = load_adapter(t.family, t.path, dtype=t.dtype, device=str(device), max_sequence_length=t.max_sequence_length)
    base = adapter.transformer
    student = None
    if d.mode == "full":
        student = copy.deepcopy(base).requires_grad_(True)  # before adapters: a plain transformer
    torch.manual_seed(d.seed)  # identical adapter/head init on every rank (DeepSpeed also broadcasts)
    fake_base = None
    if separate_fake_base:
        fake_base = copy.deepcopy(base)
        add_swd_adapters(fake_base, d.lora.rank, d.lora.alpha, d.lora.targets, names=(FAKE,))
    roles = (STUDENT,) if fake_base is not None else (STUDENT, FAKE)
    add_swd_adapters(base, d.lora.rank, d.lora.alpha, d.lora.targets, names=(FAKE,) if student is not None else roles)
    if not 0 <= d.losses.feature_block < adapter.num_blocks:
        raise ValueError(f"distill.losses.feature_block {d.losses.feature_block}: the teacher has "
                         f"{adapter.num_blocks} blocks (0..{adapter.num_blocks - 1})")
    dim = base.config.num_attention_heads * base.config.attention_head_dim
    head = GANHead(dim).to(device)
    return adapter, Networks(adapter, head, d.losses.feature_block, student_transformer=student, fake_transformer=fake_base)


def build_engines(cfg: PipelineConfig, nets, micro_batch: int, bf16: bool):
    """DeepSpeed engines for the student and for the fake score + GAN head (ZeRO ≤ 2: its
    module holds the frozen base the teacher also uses)."""
    import deepspeed

    d = cfg.distill
    student_module = nets.student_transformer if not nets.lora_student else torch.nn.ModuleDict({"base": nets.base})
    engine_g, *_ = deepspeed.initialize(model=student_module, model_parameters=nets.student_parameters(),
                                        config=deepspeed_config(cfg, d.lr, d.zero_stage, micro_batch, bf16),
                                        lr_scheduler=lr_schedule(cfg, updates_per_step=1))
    engine_f, *_ = deepspeed.initialize(model=torch.nn.ModuleDict({"base": nets.fake_base, "head": nets.head}),
                                        model_parameters=nets.fake_parameters(),
                                        config=deepspeed_config(cfg, d.fake_lr or d.lr, min(d.zero_stage, 2),
                                                                micro_batch, bf16),
                                        lr_scheduler=lr_schedule(cfg, updates_per_step=d.fake_updates))
    return engine_g, engine_f


def student_ema(cfg: PipelineConfig, nets):
    """diffusers' EMAModel over the student's trainable weights, kept in float32 (a bf16 average
    would lose the small updates), or None when `distill.ema_decay` is 0."""
    if cfg.distill.ema_decay == 0:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(nets.student_parameters(), decay=cfg.distill.ema_decay)
    ema.to(dtype=torch.float32)
    return ema


@contextmanager
def averaged_student(ema, params):
    """Inside the block the student's `params` hold their EMA weights (for export and evaluation);
    after it, their training weights again."""
    if ema is None:
        yield
        return
    params = list(params)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def lr_schedule(cfg: PipelineConfig, updates_per_step: int):
    """optimizer -> LambdaLR with `swd_core.training.lr_factor` (DeepSpeed steps it with the
    optimizer and keeps its state in checkpoints); None when the rate is constant."""
    from swd_core.training import lr_factor

    d = cfg.distill
    if d.lr_decay_fraction == 0 or updates_per_step == 0:
        return None
    factor = partial(lr_factor, total=d.steps * updates_per_step, decay_fraction=d.lr_decay_fraction)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(shard, rows, store, batch_size: int, epoch: int, done: int, window: int, seed: int):
    """Endless ((epoch, rows of it done), decoded batch) over this worker's `rows` (a
    `pipelines.sharding.WorkerRows`), epoch after epoch, each epoch shuffled in windows of
    `window` rows (`shuffled_windows`), from row `done` of `epoch` (a resume reads on from there)."""
    from pipelines.sharding import fixed_batches, shuffled_windows, worker_blocks

    def blocks():
        e, start = epoch, done
        while True:
            first = start - start % window if window else start  # a resume re-reads its window
            whole = shard.iter_batches(batch_size=None, batch_format="numpy")  # Ray Data's blocks, cut below
            for offset, block in shuffled_windows(worker_blocks(whole, rows, first), rows.count, window, seed, e, start):
                yield (e, offset), block
            e, start = e + 1, 0

    for position, batch in fixed_batches(blocks(), batch_size):
        yield position, store.decode(batch)


def _data_position(state: dict, digest: str, rank: int) -> tuple[int, int, str | None]:
    """(epoch, rows of it done) for this rank from a checkpoint's state, and a note when the
    position cannot be kept: it is valid only for the same store files and worker count."""
    if state.get("data_plan") == digest:
        epoch, done = state["data_positions"][rank]
        return epoch, done, None
    why = ("the checkpoint predates per-worker data positions" if "data_plan" not in state
           else "the data plan changed since the checkpoint (the store's files, the number of workers, "
                "distill.shuffle_window or distill.seed)")
    return state["epoch"] + 1, 0, f"{why}: data restarts at a new epoch"


def train_iteration(nets, engine_g, engine_f, next_batch, schedule, settings, uncond, step: int,
                    fake_updates: int, g: torch.Generator) -> tuple[int, dict[str, float]]:
    """One SwD iteration at one scale, in the authors' order: `fake_updates` fake-score updates, then the
    generator update, so the critic that judges the student at s_i has just been fitted to its
    samples at s_i. Each update takes a fresh batch. `next_batch()` returns (text, {scale:
    latents}); engines are DeepSpeed engines (or anything with backward/step/get_global_grad_norm).
    Returns (scale index, logged terms)."""
    from torch.profiler import record_function

    from swd_core.scale_ops import x0_from_velocity
    from swd_core.training import fake_update_loss, frozen, generator_loss, logged_floats, student_input, student_samples

    i = step % schedule.num_steps  # round-robin scale, shared by every batch of the iteration
    z_i = schedule.scales[i]
    terms: dict = {}

    # fake-score updates on stop-grad student samples at s_i; the student does not change
    # meanwhile, so one batched call samples for all of them
    batches = [next_batch() for _ in range(fake_updates)]
    with torch.no_grad(), record_function("student_samples"):  # names in a torch.profiler trace
        samples = student_samples(nets, batches, schedule, i, g)
    for (text, latents), x0 in zip(batches, samples):
        with record_function("fake_update"):
            loss_f, terms_f = fake_update_loss(nets, x0, latents[z_i], text, settings, g)
            engine_f.backward(loss_f)
            engine_f.step()
        terms.update(terms_f)
    if fake_updates:
        terms["grad_norm_f"] = engine_f.get_global_grad_norm()

    # generator update on one more batch: gradients pass through the frozen fake network into
    # the student only
    text, latents = next_batch()
    x, sigma = student_input(latents, schedule, i, g)
    with frozen(nets.fake_parameters()), record_function("generator_update"):
        x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
        loss, terms_g = generator_loss(nets, x0, latents[z_i], text, uncond, settings, g)
        engine_g.backward(loss)
        engine_g.step()
    terms = {**terms_g, "grad_norm_g": engine_g.get_global_grad_norm(), **terms}
    return i, logged_floats(terms)  # the iteration's one wait for the GPU


class Validation:
    """Early stopping on held-out prompts (`distill.validation`). At each checkpoint every worker
    samples its share of the validation prompts with the student as it would be exported; rank 0
    scores them all with the shapes evaluator and every rank receives the scores, so all agree on
    whether the export is replaced (a ZeRO-3 export gathers shards on every rank)."""

    def __init__(self, cfg: PipelineConfig, rank: int, world: int, image_size: int):
        from swd_core.toy import shapes

        if image_size != shapes.IMAGE_SIZE:  # every rank, before training: not at the first checkpoint
            raise ValueError(f"distill.validation: the student makes {image_size} px images and the shapes "
                             f"evaluator reads {shapes.IMAGE_SIZE} px ones; set distill.validation.num_prompts: 0")
        self.cfg = cfg
        v = cfg.distill.validation
        self.num_prompts, self.key, self.lower_is_better = v.num_prompts, v.score_key, v.mode == "min"
        self.samples = shapes.validation_prompts(v.num_prompts)
        self.seeds = [cfg.evaluate.seed + i for i in range(v.num_prompts)]
        self.rank, self.world, self.batch_size = rank, world, v.batch_size
        self.schedule = cfg.schedule()
        self._scorer = None

    def restore(self, record: dict | None) -> dict:
        """The choice a checkpoint carried, if this definition chooses the same way. Its `best`
        always names the exported weights, so a changed metric starts the choice afresh (the
        next score replaces the export), and a changed prompt count drops the scores too (FD
        depends on n). So does an export whose record names another step: an attempt stopped
        after exporting and before its checkpoint, or while exporting (the record goes last)."""
        fresh = {"num_prompts": self.num_prompts, "best": None, "history": []}
        if not record:
            return fresh
        if record.get("num_prompts") != self.num_prompts:
            self._say(f"validation.num_prompts changed ({record.get('num_prompts')} -> {self.num_prompts}): "
                      "earlier scores are not comparable; the choice starts afresh")
            return fresh
        if record["best"] is not None and record["best"]["metric"] != self.key:
            self._say(f"validation.metric changed ({record['best']['metric']} -> {self.key}): the choice starts "
                      "afresh; the next checkpoint's student replaces the export")
            return {**fresh, "history": list(record["history"])}
        best = record["best"]
        if best is not None and (self.exported_record() or {}).get("best") != best:
            self._say(f"the export does not hold step {best['step']}, the checkpoint's choice (an attempt stopped "
                      "after or while exporting): the next checkpoint's student replaces it")
            return {**record, "best": None}
        return record

    def exported_record(self) -> dict | None:
        """The export's `validation.json`, or None: rank 0 reads it and every rank receives it."""
        from pipelines.store import read_json

        record = [None]
        if self.rank == 0:
            try:
                record[0] = read_json(f"{student_dir(self.cfg)}/{RECORD_FILE}", self.cfg.resources)
            except ValueError:  # cut short by a stopped attempt: names no step
                pass
        if self.world > 1:
            torch.distributed.broadcast_object_list(record, src=0)
        return record[0]

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[distill] {message}", flush=True)

    def scores(self, nets) -> dict[str, float]:
        from swd_core.evaluate_model import ShapesScorer, sample_images

        share = slice(self.rank, None, self.world)  # worker r samples prompts r, r + world, ...
        with nets.student_sampler() as student:
            images = sample_images(student, [s.caption for s in self.samples[share]], self.seeds[share],
                                   batch_size=self.batch_size, schedule=self.schedule)
        shares = [None] * self.world
        torch.distributed.all_gather_object(shares, images)
        out = [None]
        if self.rank == 0:
            images = torch.stack([shares[i % self.world][i // self.world] for i in range(len(self.samples))])
            if self._scorer is None:  # real renders and the classifier, once
                self._scorer = ShapesScorer(self.samples)
            scores, _ = self._scorer.score(images)
            out = [{"val_fd": scores["fd"], "val_fd_mean_term": scores["fd_mean_term"],
                    "val_prompt_accuracy": scores["prompt_accuracy"]}]
        torch.distributed.broadcast_object_list(out, src=0)
        return out[0]

    def improves(self, value: float, best: dict | None) -> bool:
        """Better than `best`; a tie goes to the later step (as Ray ranks checkpoints); a
        non-finite score never wins and never stays chosen against a finite one."""
        if not math.isfinite(value):
            return best is None
        if best is None or not math.isfinite(best["value"]):
            return True
        return value <= best["value"] if self.lower_is_better else value >= best["value"]

    def choose(self, step: int, nets, chosen: dict, export: Callable[..., None]) -> dict[str, float]:
        """Score the student at `step` and add it to `chosen` (the best step and every score);
        on a better score `export(validation=chosen)` replaces the export (called on every rank), else only
        the export's `validation.json` is rewritten. Returns the metrics to report."""
        scores = self.scores(nets)
        value = scores[self.key]
        improved = self.improves(value, chosen["best"])
        chosen["history"].append({"step": step, **scores})
        if improved:
            chosen["best"] = {"step": step, "metric": self.key, "value": value}
        self._say(f"validation at step {step}: fd {scores['val_fd']:.4g} (mean term {scores['val_fd_mean_term']:.3g}), "
                  f"accuracy {scores['val_prompt_accuracy']:.3f} | "
                  + ("best so far: exporting" if improved else f"best stays step {chosen['best']['step']}"))
        if improved:
            export(validation=chosen)
        elif self.rank == 0:
            _write_record(student_dir(self.cfg), chosen, self.cfg.resources)
        return {**scores, "val_best_step": chosen["best"]["step"]}


def _quiet_report_log() -> None:
    """Ray Train logs every `report` at INFO with all its metrics, from every rank; the progress
    line says the same once. Its logger is named after its file, so RunConfig's LoggingConfig
    (which filters loggers named `ray.train*`) does not reach it: it is found through the module."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    _quiet_report_log()
    import deepspeed
    import ray.train
    from ray.train.torch import get_device

    from swd_core.adapters import TextEmbeddings

    from pipelines.sharding import plan_digest

    cfg = PipelineConfig.model_validate(config["pipeline"])
    store, plan, d = config["store"], config["data_plan"], cfg.distill
    digest = plan_digest(plan, store.data_root(), (d.shuffle_window, d.seed))  # names this run's data order in checkpoints
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    micro = d.batch_size // world
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    schedule = cfg.schedule()
    settings = loss_settings(cfg)

    adapter, nets = build_networks(cfg, device)
    deepspeed.init_distributed()  # joins the process group Ray Train already set up
    engine_g, engine_f = build_engines(cfg, nets, micro, bf16)
    ema = student_ema(cfg, nets)
    student_params = nets.student_parameters()
    # Where each rank runs (recorded in every checkpoint's state.json and printed once).
    workers = [None] * world
    torch.distributed.all_gather_object(workers, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                                  "pid": os.getpid()})
    n_nodes = len({w["node_id"] for w in workers})
    if rank == 0:
        print(f"[distill] {world} workers on {n_nodes} node(s): "
              + ", ".join(f"rank {w['rank']} node {w['node_id'][:8]} pid {w['pid']}" for w in workers), flush=True)
    dtype = adapter.dtype
    empty = store.empty_prompt()
    uncond = TextEmbeddings(empty[0], empty[1]).to(device, dtype)

    step, epoch, rows_done = 0, 0, 0  # the data position: rows of this epoch consumed
    validation = None
    if d.validation.num_prompts:
        validation = Validation(cfg, rank, world, image_size=schedule.scales[-1] * adapter.vae_scale_factor)
    chosen = None  # with validation: the exported student's record (the chosen step and every score)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine_g.load_checkpoint(f"{ckpt_dir}/student", tag=CKPT_TAG, load_module_strict=False)
            engine_f.load_checkpoint(f"{ckpt_dir}/fake", tag=CKPT_TAG, load_module_strict=False)
            state = json.loads(Path(ckpt_dir, "state.json").read_text())
            if ema is not None and Path(ckpt_dir, EMA_FILE).exists():
                ema.load_state_dict(torch.load(Path(ckpt_dir, EMA_FILE), map_location=device))
            elif ema is not None and rank == 0:
                print("[distill] the checkpoint holds no student EMA: the average starts here", flush=True)
        step, chosen = state["step"], state.get("validation")
        epoch, rows_done, note = _data_position(state, digest, rank)
        if rank == 0:
            print(f"[distill] resumed from checkpoint at step {step}" + (f"; {note}" if note else ""), flush=True)
    if validation is not None:
        chosen = validation.restore(chosen)
    data = _batches(ray.train.get_dataset_shard("train"), plan[rank], store, micro, epoch, rows_done,
                    d.shuffle_window, d.seed)

    data_wait = 0.0  # seconds spent waiting for batches: shows when training is input-bound

    def next_batch():
        nonlocal epoch, rows_done, data_wait
        start = time.perf_counter()
        (epoch, rows_done), batch = next(data)
        data_wait += time.perf_counter() - start
        text = TextEmbeddings(batch["prompt_embeds"], batch["pooled_prompt_embeds"]).to(device, dtype)
        latents = {s: batch[f"latents_{s}"].to(device) for s in set(schedule.scales)}
        return text, latents

    window, run_times = [], []
    while step < d.steps:
        t0, data_wait = time.perf_counter(), 0.0
        g = torch.Generator().manual_seed(d.seed * 1_000_003 + rank * 10_007 + step)  # resume-exact noise
        i, terms = train_iteration(nets, engine_g, engine_f, next_batch, schedule, settings, uncond, step,
                                   d.fake_updates, g)
        if ema is not None:
            ema.step(student_params)
        step += 1
        window.append(time.perf_counter() - t0)
        run_times.append(window[-1])
        metrics = {"step": step, "scale": schedule.scales[i], "nodes": n_nodes, "iter_s": window[-1], "data_wait_s": data_wait,
                   # mean over this run's iterations after the first (which pays for warm-up)
                   "mean_iter_s": sum(run_times[1:]) / max(len(run_times) - 1, 1),
                   "samples_per_s": d.batch_size * (1 + d.fake_updates) / window[-1],
                   "lr": engine_g.get_lr()[0], **terms}
        save = step % d.checkpoint_every == 0 or step == d.steps
        if step % d.log_every == 0 or save or step == 1:
            if rank == 0:
                line = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
                print(f"[distill] step {step}/{d.steps} scale {schedule.scales[i]} lr {metrics['lr']:.3g} | {line} | "
                      f"{sum(window) / len(window):.2f} s/it (data wait {data_wait:.2f} s), "
                      f"{metrics['samples_per_s']:.1f} samples/s", flush=True)
            window = []
        if save and validation is not None:
            # the student as exported (its EMA when on), scored and maybe exported before the
            # checkpoint that records the choice is reported
            with averaged_student(ema, student_params):
                metrics.update(validation.choose(step, nets, chosen, export=partial(
                    _export_student, cfg, rank, engine_g, adapter, nets, final=True)))
        if save:
            positions = [None] * world  # every rank's own place in its rows
            torch.distributed.all_gather_object(positions, [epoch, rows_done])
            _report_checkpoint(cfg, rank, engine_g, engine_f, ema, metrics, adapter, nets,
                               {"step": step, "epoch": epoch, "workers": workers, "data_plan": digest,
                                "data_positions": positions, "validation": chosen})
        elif step % d.log_every == 0:
            ray.train.report(metrics)

    if validation is None:
        with averaged_student(ema, student_params):
            _export_student(cfg, rank, engine_g, adapter, nets, final=True)
    elif rank == 0 and chosen["best"] is not None:  # validation chose and exported already
        best = chosen["best"]
        print(f"[distill] the exported student is step {best['step']} of {d.steps}, chosen by "
              f"{best['metric']} {best['value']:.4g} on {d.validation.num_prompts} validation prompts", flush=True)


def _report_checkpoint(cfg, rank, engine_g, engine_f, ema, metrics, adapter, nets, state) -> None:
    import ray.train

    if cfg.distill.export_at_checkpoints and state["step"] < cfg.distill.steps:
        # before the checkpoint: a restart from an earlier one exports this step again
        with averaged_student(ema, nets.student_parameters()):
            _export_student(cfg, rank, engine_g, adapter, nets, final=False, step=state["step"])
    with tempfile.TemporaryDirectory() as tmp:
        # exclude_frozen_parameters: the frozen base is the teacher, already on disk; checkpoints hold
        # only what training changes (adapters, head, or the sharded full student) plus optimizer state.
        engine_g.save_checkpoint(f"{tmp}/student", tag=CKPT_TAG, exclude_frozen_parameters=True)
        engine_f.save_checkpoint(f"{tmp}/fake", tag=CKPT_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            Path(tmp, "state.json").write_text(json.dumps({**state, "metrics": metrics}, indent=2))
            if ema is not None:  # the same on every rank (ZeRO <= 2 keeps whole student weights)
                torch.save(ema.state_dict(), Path(tmp, EMA_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export_student(cfg, rank, engine_g, adapter, nets, final: bool, step: int | None = None,
                    *, validation: dict | None = None) -> None:
    """Rank 0 writes the student as a PEFT LoRA (LoRA mode) and a merged diffusers pipeline
    folder, plus a sample grid, to <run_dir>/student (or student/step_<n>); with a `validation`
    record (the chosen step and the score history) also `validation.json`, last: until it is
    there again, the export names no step (`Validation.restore` checks it on resume)."""
    from swd_core.export import export_lora, export_merged_pipeline

    full = not nets.lora_student
    state = None
    if full:  # every rank takes part in gathering ZeRO-3 shards
        if cfg.distill.zero_stage == 3:
            state = engine_g._zero3_consolidated_16bit_state_dict()
        else:
            state = engine_g.module.state_dict()
    if rank != 0:
        return
    from pipelines.storage import filesystem, upload_dir

    dest = student_dir(cfg) + ("" if final else f"/step_{step}")
    if final:  # the old record must not name the new weights
        try:
            filesystem(dest, cfg.resources).rm(f"{dest}/{RECORD_FILE}")
        except FileNotFoundError:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        t = cfg.teacher
        if full:
            student = type(nets.student_transformer).from_config(nets.student_transformer.config)
            student.load_state_dict({k: v.float() for k, v in state.items()})
            export_merged_pipeline(t.path, f"{tmp}/merged", cfg.schedule(), transformer=student,
                                   max_sequence_length=t.max_sequence_length, dtype=t.dtype)
        else:
            export_lora(adapter, f"{tmp}/lora")
            export_merged_pipeline(t.path, f"{tmp}/merged", cfg.schedule(), lora_dir=f"{tmp}/lora",
                                   max_sequence_length=t.max_sequence_length, dtype=t.dtype)
        _sample_grid(cfg, f"{tmp}/merged", f"{tmp}/samples.png")
        upload_dir(tmp, dest, cfg.resources)
    if validation is not None:
        _write_record(dest, validation, cfg.resources)
    print(f"[distill] exported the student to {dest} (merged/, {'' if full else 'lora/, '}samples.png)", flush=True)


def student_dir(cfg: PipelineConfig) -> str:
    """Where the distilled student is exported (and the export's validation record lives)."""
    return f"{cfg.run_dir}/student"


def _write_record(export: str, record: dict, resources) -> None:
    from pipelines.storage import write_bytes

    write_bytes(f"{export}/{RECORD_FILE}", json.dumps(record, indent=2).encode(), resources)


def _sample_grid(cfg: PipelineConfig, merged_dir: str, out_png: str) -> None:
    from swd_core.evaluate_model import load_exported_student
    from swd_core.generate import generate_images
    from swd_core.grid import image_grid

    adapter, schedule, _ = load_exported_student(merged_dir, cfg.teacher.family)
    prompts = cfg.data.preview_prompts
    seeds = [cfg.evaluate.seed + i for i in range(len(prompts))]
    images = generate_images(adapter, prompts, seeds, schedule=schedule)
    image_grid([[im] for im in images], prompts, [f"student, {schedule.num_steps} steps"],
               title=f"{cfg.name}: scales {list(schedule.scales)}").save(out_png)


# ----------------------------------------------------------------------------------------------
# driver side


def _absolute(cfg: PipelineConfig) -> PipelineConfig:
    """Workers run in other directories (and on other nodes): give them absolute paths for the
    run's storage and for a store placed elsewhere (`precompute.output`)."""
    def local_relative(path: str | None) -> bool:
        return bool(path) and not path.startswith("s3://") and not os.path.isabs(path)

    update = {}
    if local_relative(cfg.resources.storage):
        update["resources"] = cfg.resources.model_copy(update={"storage": os.path.abspath(cfg.resources.storage)})
    if local_relative(cfg.precompute.output):
        update["precompute"] = cfg.precompute.model_copy(update={"output": os.path.abspath(cfg.precompute.output)})
    return cfg.model_copy(update=update) if update else cfg


def storage_filesystem(cfg: PipelineConfig):
    """pyarrow filesystem for Ray Train's RunConfig: S3 with the definition's endpoint, else None."""
    if not cfg.resources.storage.startswith("s3://"):
        return None
    import pyarrow.fs

    s3 = cfg.resources.s3
    kwargs = {}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    if s3.region:
        kwargs["region"] = s3.region
    return pyarrow.fs.S3FileSystem(**kwargs)


def build_trainer(cfg: PipelineConfig, store):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import worker_env
    from pipelines.sharding import StoreShards, plan_shards

    r, d = cfg.resources, cfg.distill
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    storage_path = f"{cfg.run_dir}/train"
    if storage_path.startswith("s3://"):
        storage_path = storage_path.removeprefix("s3://")  # with an explicit filesystem Ray wants a bare path
    file_rows = store.file_rows()  # one listing of the store: the plan and the named dataset share it
    plan = plan_shards(file_rows, r.num_workers, d.batch_size // r.num_workers)  # each worker's rows
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": cfg.model_dump(mode="json"), "store": store, "data_plan": plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=r.placement_strategy),
        # by name; StoreShards reads each worker's part of it
        datasets={"train": store.dataset(files=[path for path, _ in file_rows])},
        dataset_config=StoreShards(store, plan),
        run_config=RunConfig(
            name="distill", storage_path=storage_path, storage_filesystem=storage_filesystem(cfg),
            failure_config=FailureConfig(max_failures=d.max_failures),
            # with validation, the kept checkpoints are the best scored ones (Ray always keeps the latest too)
            checkpoint_config=CheckpointConfig(
                num_to_keep=d.keep_checkpoints,
                checkpoint_score_attribute=d.validation.score_key if d.validation.num_prompts else None,
                checkpoint_score_order=d.validation.mode),
            # Ray Train's print patch tees each print of a worker (stdout is redirected there),
            # so every progress line reached the driver twice.
            worker_runtime_env={"env_vars": {**worker_env(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


def run(cfg: PipelineConfig) -> dict:
    from pipelines.ray_runtime import ensure_ray
    from pipelines.store import open_store

    cfg = _absolute(cfg)
    r, d = cfg.resources, cfg.distill
    if d.batch_size % r.num_workers:
        raise ValueError(f"distill.batch_size {d.batch_size} must be divisible by resources.num_workers {r.num_workers}")
    store = open_store(cfg)  # refuses a store built for another definition, with what differs
    missing = sorted(set(cfg.schedule().scales) - set(store.scales))
    if missing:
        raise ValueError(f"the store at {store.uri} has no latents at scales {missing}; rerun the precompute stage")
    ensure_ray(cfg)
    schedule = cfg.schedule()
    print(f"[distill] {d.mode} student, ZeRO-{d.zero_stage}, {r.num_workers} workers, batch {d.batch_size}, "
          f"{d.steps} steps, {'scale-wise' if schedule.is_scalewise else 'full-resolution'} scales {list(schedule.scales)}",
          flush=True)
    start = time.perf_counter()
    result = build_trainer(cfg, store).fit()
    if result.error:
        raise result.error
    metrics = dict(result.metrics or {})
    out = {"student": student_dir(cfg), "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "seconds": time.perf_counter() - start, "final_metrics": metrics}
    chosen = f" (step {metrics['val_best_step']}, chosen by validation)" if "val_best_step" in metrics else ""
    print(f"[distill] done in {out['seconds']:.0f} s; student at {out['student']}{chosen}", flush=True)
    return out
