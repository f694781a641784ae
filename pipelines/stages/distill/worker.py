"""One Ray Train worker of the distill stage (`train_loop_per_worker`): build the networks and
their engines, restore the latest checkpoint, then per step one iteration and its metrics, and
at checkpoints validation and the checkpoint itself; last, the export of the student."""

from __future__ import annotations

import os
import time
from functools import partial

import torch

from pipelines.logs import configure, logger
from pipelines.ray_compat import quiet_train_report_log
from pipelines.ray_runtime import quiet_libraries
from pipelines.schema import PipelineConfig
from pipelines.stages.distill.checkpoint import checkpoint_state, report_checkpoint, restore_checkpoint
from pipelines.stages.distill.data import DataStream, worker_batches
from pipelines.stages.distill.engines import (
    averaged_student,
    build_engines,
    build_networks,
    import_deepspeed,
    loss_settings,
    student_ema,
)
from pipelines.stages.distill.export import export_student, student_dir
from pipelines.stages.distill.iteration import train_iteration
from pipelines.stages.distill.progress import Progress
from pipelines.stages.distill.validation import Validation

log = logger(__name__)


def train_loop_per_worker(config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    quiet_train_report_log()
    quiet_libraries()  # the teacher's load, and each validation's and export's load of the student
    import ray.train
    from ray.train.torch import get_device

    from pipelines.sharding import plan_digest
    from swd_core.adapters import TextEmbeddings

    cfg = PipelineConfig.model_validate(config["pipeline"])
    store, plan, d = config["store"], config["data_plan"], cfg.distill
    # names this run's data order in checkpoints
    digest = plan_digest(plan, store.data_root(), (d.shuffle_window, d.seed))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure(config.get("log_level"), rank=rank)  # one line per event: rank 0's, and every rank's warnings
    deepspeed = import_deepspeed()  # before the tracking thread imports mlflow, which it hides
    tracker = None  # rank 0's MLflow run; its thread opens the store while the networks build
    if rank == 0 and config.get("tracking"):
        from pipelines.tracking import RunLogger

        tracker = RunLogger(cfg, config["tracking"])
    device = get_device()
    micro = d.batch_size // world
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    schedule = cfg.schedule()
    settings = loss_settings(cfg)

    adapter, nets = build_networks(cfg, device)
    deepspeed.init_distributed()  # joins the process group Ray Train already set up
    student_engine, fake_engine = build_engines(cfg, nets, micro, bf16)
    ema = student_ema(cfg, nets)
    student_params = nets.student_parameters()
    workers = _placement(rank, world, device)
    empty = store.empty_prompt()
    uncond = TextEmbeddings(empty[0], empty[1]).to(device, adapter.dtype)
    validation = None
    if d.validation.num_prompts:
        validation = Validation(cfg, rank, world, image_size=schedule.scales[-1] * adapter.vae_scale_factor)

    # with validation, `chosen` is the exported student's record (the chosen step and every score)
    step, epoch, rows_done, chosen = restore_checkpoint(cfg, rank, student_engine, fake_engine, ema, device, digest,
                                                        config.get("warm_start"))
    if validation is not None:
        chosen = validation.restore(chosen)
    data = DataStream(worker_batches(ray.train.get_dataset_shard("train"), plan[rank], store, micro, epoch, rows_done,
                                     d.shuffle_window, d.seed),
                      epoch, rows_done, device, adapter.dtype, schedule.scales)
    progress = Progress(cfg, rank, nodes=len({w["node_id"] for w in workers}))
    export = partial(export_student, cfg, rank, student_engine, adapter, nets, final=True)

    while step < d.steps:
        t0, data.data_wait = time.perf_counter(), 0.0
        rng = torch.Generator().manual_seed(d.seed * 1_000_003 + rank * 10_007 + step)  # resume-exact noise
        i, terms = train_iteration(nets, student_engine, fake_engine, data.next_batch, schedule, settings, uncond,
                                   step, d.fake_updates, rng)
        if ema is not None:
            ema.step(student_params)
        step += 1
        metrics = progress.metrics(step, i, terms, time.perf_counter() - t0, data.data_wait,
                                   student_engine.get_lr()[0])
        save = step % d.checkpoint_every == 0 or step == d.steps
        progress.log(metrics, terms, save)
        if save and validation is not None:
            # the student as exported (its EMA when on), scored and maybe exported before the
            # checkpoint that records the choice is reported
            with averaged_student(ema, student_params):
                metrics.update(validation.choose(step, nets, chosen, export=export))
        if tracker is not None and (save or step % d.log_every == 0):
            tracker.metrics(step, metrics)
        if save and tracker is not None:
            images, captions = validation.last_samples if validation is not None else (None, None)
            exported = (f"{student_dir(cfg)}/step_{step}/samples.png"
                        if d.export_at_checkpoints and step < d.steps else None)
            tracker.samples(step, images, captions, exported)
            tracker.flush()  # a run resumed from this checkpoint has logged every step up to it
        if save:
            state = checkpoint_state(cfg, step, [data.epoch, data.rows_done], world, workers, digest, chosen)
            report_checkpoint(cfg, rank, student_engine, fake_engine, ema, metrics, adapter, nets, state)
        elif step % d.log_every == 0:
            ray.train.report(metrics)

    if tracker is not None:  # drawn while the student exports
        best = (chosen or {}).get("best") if validation is not None else None
        tracker.curves(best["step"] if best else step)
    if validation is None:
        with averaged_student(ema, student_params):
            export()
    elif rank == 0:  # validation chose and exported already
        validation.announce(chosen)
    if tracker is not None:
        tracker.close()


def _placement(rank: int, world: int, device: torch.device) -> list[dict]:
    """Where each rank runs (recorded in every checkpoint's state.json and printed once)."""
    import ray

    workers = [None] * world
    torch.distributed.all_gather_object(workers, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                                                  "pid": os.getpid(), "device": str(device)})
    if rank == 0:
        log.info(f"{world} workers on {len({w['node_id'] for w in workers})} node(s): "
                 + ", ".join(f"rank {w['rank']} node {w['node_id'][:8]} pid {w['pid']} {w['device']}"
                             for w in workers))
    return workers
