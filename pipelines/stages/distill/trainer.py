"""The distill stage's driver (`run`): all its Ray wiring in one place: the dataset from the
precomputed store and each worker's fixed share of it, `ScalingConfig`, `RunConfig` (storage
local or s3://, `FailureConfig`, `CheckpointConfig`), and a `TorchTrainer` whose workers run
`worker.train_loop_per_worker`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from pipelines.logs import LEVEL_ENV, logger
from pipelines.schema import PipelineConfig
from pipelines.stages.distill.export import student_dir
from pipelines.stages.distill.worker import train_loop_per_worker

log = logger(__name__)


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
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


def train_worker_env(use_gpu: bool) -> dict[str, str]:
    """The Ray Train workers' environment. The driver's DS_ACCELERATOR describes the driver's node:
    on a cluster that is the head, which has no GPU, so GPU workers choose their own (worker.py)."""
    from pipelines.ray_compat import TRAIN_WORKER_ENV
    from pipelines.ray_runtime import worker_env

    env = {**worker_env(), **TRAIN_WORKER_ENV}
    if use_gpu:
        env.pop("DS_ACCELERATOR", None)
    return env


def build_trainer(cfg: PipelineConfig, store, warm_start: str | None = None, callbacks: list | None = None,
                  tracking: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.sharding import StoreShards, plan_shards
    from pipelines.storage import arrow_filesystem, fs_path

    r, d = cfg.resources, cfg.distill
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    storage_path = f"{cfg.run_dir}/train"
    storage_filesystem = None  # a local path: Ray Train picks its own filesystem
    if storage_path.startswith("s3://"):
        storage_filesystem = arrow_filesystem(storage_path, r)
        storage_path = fs_path(storage_path)  # with an explicit filesystem Ray wants a bare path
    file_rows = store.file_rows()  # one listing of the store: the plan and the named dataset share it
    plan = plan_shards(file_rows, r.num_workers, d.batch_size // r.num_workers)  # each worker's rows
    log.debug(f"store {store.data_root()}: {len(file_rows)} file(s); checkpoints under {storage_path}")
    return TorchTrainer(
        train_loop_per_worker,
        # warm_start: another run's checkpoint to start from while this run has none of its own
        # (scheduled retraining trains the champion further; a restarted cycle resumes its own)
        train_loop_config={"pipeline": cfg.model_dump(mode="json"), "store": store, "data_plan": plan,
                           "warm_start": warm_start, "tracking": tracking, "log_level": os.environ.get(LEVEL_ENV)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=r.placement_strategy),
        # by name; StoreShards reads each worker's part of it
        datasets={"train": store.dataset(files=[path for path, _ in file_rows])},
        dataset_config=StoreShards(store, plan),
        run_config=RunConfig(
            name="distill", storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=d.max_failures),
            # with validation, the kept checkpoints are the best scored ones (Ray always keeps the latest too)
            checkpoint_config=CheckpointConfig(
                num_to_keep=d.keep_checkpoints,
                checkpoint_score_attribute=d.validation.score_key if d.validation.num_prompts else None,
                checkpoint_score_order=d.validation.mode),
            worker_runtime_env={"env_vars": train_worker_env(use_gpu)},
            callbacks=callbacks or None,
        ),
    )


def run(cfg: PipelineConfig, warm_start: str | None = None, callbacks: list | None = None) -> dict:
    """Train the definition's student; `warm_start`: a checkpoint (of this stage, from another
    run) to start from when the run has none of its own; `callbacks`: `ray.train.UserCallback`s
    (they run in Ray Train's controller and see every report)."""
    from pipelines.ray_runtime import ensure_ray
    from pipelines.store import open_store

    cfg = with_absolute_paths(cfg)
    r, d = cfg.resources, cfg.distill
    if d.batch_size % r.num_workers:
        raise ValueError(f"distill.batch_size {d.batch_size} must be divisible by "
                         f"resources.num_workers {r.num_workers}")
    store = open_store(cfg)  # refuses a store built for another definition, with what differs
    missing = sorted(set(cfg.schedule().scales) - set(store.scales))
    if missing:
        raise ValueError(f"the store at {store.uri} has no latents at scales {missing}; rerun the precompute stage")
    from pipelines.tracking import resolve_store

    tracking = resolve_store(cfg)  # rank 0 logs to it (pipelines/tracking.py)
    ensure_ray(cfg)
    schedule = cfg.schedule()
    log.info(f"{d.mode} student, ZeRO-{d.zero_stage}, {r.num_workers} workers, batch {d.batch_size}, "
             f"{d.steps} steps, {'scale-wise' if schedule.is_scalewise else 'full-resolution'} "
             f"scales {list(schedule.scales)}")
    start = time.perf_counter()
    from ray.train import TrainingFailedError

    main_thread = threading.current_thread() is threading.main_thread()
    ctrl_c = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        try:
            result = build_trainer(cfg, store, warm_start, callbacks, tracking).fit()
        except SystemExit as stop:
            # Ray Train's Ctrl-C handler, in place during fit, aborts the run and calls sys.exit(0),
            # which Ray's get turns into a SystemExit(1) without a word (as does Ray's SIGTERM
            # handler where no entry point replaced it). Taken as the stop it is: under
            # pipelines/stopping.py one line, and exit 130 (143 on SIGTERM).
            raise KeyboardInterrupt from stop
        finally:
            if main_thread:
                # Ray leaves its handler in place after fit; a Ctrl-C in a later stage (evaluate,
                # deploy's serving loop) would only ask the finished run to abort, and be lost
                signal.signal(signal.SIGINT, ctrl_c if ctrl_c is not None else signal.default_int_handler)
    except BaseException as err:
        if tracking is not None:  # rank 0 never got to close its MLflow run
            from pipelines.tracking import end_run

            end_run(cfg, "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED")
        if isinstance(err, TrainingFailedError):
            # Ray's error runs to many lines of worker details; these two say what happened and what to do
            restarts = "unlimited" if d.max_failures < 0 else d.max_failures
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            log.error(f"failed ({restarts} restart(s) allowed by distill.max_failures): {reason}\n"
                      f"[distill] its checkpoints stay under {cfg.run_dir}/train: "
                      "running the same definition again resumes from the last one")
        raise
    metrics = dict(result.metrics or {})
    out = {"student": student_dir(cfg), "checkpoint": result.checkpoint.path if result.checkpoint else None,
           "seconds": time.perf_counter() - start, "final_metrics": metrics}
    # the checkpoint of the exported weights (validation keeps the best scored, Ray the latest too):
    # where a further run of this student starts
    exported = result.checkpoint
    if d.validation.num_prompts and result.best_checkpoints:
        exported = result.get_best_checkpoint(d.validation.score_key, d.validation.mode) or exported
    out["export_checkpoint"] = exported.path if exported else None
    out["workers"] = _workers(result.checkpoint)
    if tracking is not None:
        from pipelines.tracking import run_record

        out["tracking"] = run_record(cfg.run_dir, cfg.resources)  # {"uri", "run_id"}
    _remove_untracked_checkpoints(result)
    for key in ("checkpoint", "export_checkpoint"):
        if out[key] and cfg.run_dir.startswith("s3://"):  # Ray names it by its bare filesystem path
            out[key] = "s3://" + out[key]
    chosen = f" (step {metrics['val_best_step']}, chosen by validation)" if "val_best_step" in metrics else ""
    log.info(f"done in {out['seconds']:.0f} s; student at {out['student']}{chosen}")
    return out


def _remove_untracked_checkpoints(result) -> None:
    """Ray Train keeps `keep_checkpoints` (plus the latest) while a run goes, but the checkpoint a
    run restarted from after a worker failure drops out of its records with its folder left in
    storage; every such folder of this run is removed here, so the setting holds across restarts."""
    import posixpath

    import pyarrow.fs as pafs

    if result.checkpoint is None:
        return
    kept = {result.checkpoint.path} | {c.path for c, _ in (result.best_checkpoints or [])}
    fs, root = result.checkpoint.filesystem, posixpath.dirname(result.checkpoint.path)
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if (info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
                and info.path not in kept):
            fs.delete_dir(info.path)
            log.info(f"removed {info.path}: a checkpoint Ray Train no longer tracks")


def _workers(checkpoint) -> list[dict]:
    """Each rank's node, pid and device, from the last checkpoint's state.json (empty without one)."""
    if checkpoint is None:
        return []
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/state.json") as f:
        return json.loads(f.read()).get("workers", [])
