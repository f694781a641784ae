"""The stage's Ray Train checkpoints: each holds both DeepSpeed engines' checkpoints (tag
`CKPT_TAG`, only what training changes), the student's EMA (`EMA_FILE`) and `state.json`: the
step, every rank's data position under the run's data plan, where the workers ran, the
validation choice, what the trained parameters are (mode, LoRA rank and targets) and the step's
metrics.

A checkpoint is read from shared storage (a resume, or a warm start from the registry), so none
of its files is unpickled: every `.pt` file is scanned for the globals it names, then read with
torch's weights-only unpickler, DeepSpeed's reads included, with only the few DeepSpeed classes
its optimizer states hold allow-listed (`ALLOWED_GLOBALS`). DeepSpeed's own loading code runs
unchanged, so a resumed run goes on exactly as the uninterrupted one."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipelines.logs import logger
from pipelines.stages.distill.data import data_position
from pipelines.stages.distill.engines import averaged_student
from pipelines.stages.distill.export import export_student

log = logger(__name__)

CKPT_TAG = "ckpt"  # DeepSpeed checkpoint tag inside each Ray checkpoint
EMA_FILE = "student_ema.pt"  # the student's weight average (distill.ema_decay), beside state.json

# Classes DeepSpeed pickles into a ZeRO optimizer's states beside tensors and plain values (found
# with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3 checkpoints, fp32 and bf16).
ALLOWED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors, plain values and `ALLOWED_GLOBALS`."""


def _allowed_globals() -> list:
    import importlib

    return [getattr(importlib.import_module(name.rpartition(".")[0]), name.rpartition(".")[2])
            for name in ALLOWED_GLOBALS]


def _refusal(path, why: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing to load the checkpoint file {path}: {why}. The distill stage never "
                                 "writes such a file; it was made or changed elsewhere, and nothing of it was run")


def load_weights_only(path, map_location=None):
    """`torch.load` with the weights-only unpickler and only `ALLOWED_GLOBALS` allowed beyond its
    defaults; anything else raises `UnsafeCheckpointError` before it is built."""
    import pickle

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(err).__name__)
        raise _refusal(path, f"it is not weights only ({why.split('. ')[0].rstrip('.')})") from None


def check_checkpoint_files(folder) -> None:
    """Refuse a checkpoint folder any of whose `.pt` files names a global beyond the allowed ones,
    before any of it is loaded (a scan of the pickles: nothing in them runs)."""
    with torch.serialization.safe_globals(_allowed_globals()):
        for path in sorted(Path(folder).rglob("*.pt")):
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except ValueError:  # not torch.save's zip format: the weights-only load decides
                continue
            if unsafe:
                raise _refusal(path, f"it names {sorted(unsafe)}, which a weights-only load does not allow")


class _WeightsOnlyReads:
    """A DeepSpeed checkpoint engine whose every read is `load_weights_only`; all else (saving,
    committing) is the wrapped engine's."""

    def __init__(self, engine):
        self._engine = engine

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def load_engine_checkpoint(engine, folder: str) -> None:
    """`engine.load_checkpoint` of tag `CKPT_TAG` in `folder` (modules non-strict: the frozen base
    is not in it), every file DeepSpeed reads going through `load_weights_only`."""
    saved = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyReads(saved)
    try:
        path, _ = engine.load_checkpoint(folder, tag=CKPT_TAG, load_module_strict=False)
    finally:
        engine.checkpoint_engine = saved
    if path is None:
        raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint {CKPT_TAG!r} in it")


def trained_parameters(cfg) -> dict:
    """What decides the shapes and names of the parameters a checkpoint holds (state.json)."""
    d = cfg.distill
    return {"mode": d.mode, "lora_rank": d.lora.rank, "lora_targets": list(d.lora.targets)}


def warm_start_checkpoint(uri: str, resources):
    """A checkpoint of another run of this stage (local path or s3://) as Ray Train names one."""
    import os

    from ray.train import Checkpoint

    from pipelines.storage import arrow_filesystem, fs_path

    if uri.startswith("s3://"):
        return Checkpoint(fs_path(uri), filesystem=arrow_filesystem(uri, resources))
    return Checkpoint(os.path.abspath(uri))


def restore_checkpoint(cfg, rank: int, student_engine, fake_engine, ema, device, digest: str,
                       warm_start: str | None = None) -> tuple[int, int, int, dict | None]:
    """Loads the run's latest checkpoint, if any, into the engines and the EMA; without one,
    `warm_start` (another run's checkpoint), if given. Returns (step, epoch, rows of it done,
    validation record) to go on from: zeros and None for a fresh run.
    A checkpoint whose trained parameters differ from the definition's is refused: its adapters
    would load partly (DeepSpeed loads modules non-strictly) and the rest would train from scratch."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint and warm_start:
        checkpoint = warm_start_checkpoint(warm_start, cfg.resources)
        if rank == 0:
            log.info(f"warm start from {warm_start}")
    if not checkpoint:
        return 0, 0, 0, None
    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads(Path(ckpt_dir, "state.json").read_text())
        saved, wanted = state.get("trained_parameters"), trained_parameters(cfg)
        if saved is not None and saved != wanted:
            differ = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in wanted.items() if saved.get(k) != v)
            raise ValueError(f"the checkpoint of run {cfg.name!r} trained other parameters than the definition asks "
                             f"for ({differ}): give the run another `name`, or set distill back to the checkpoint's")
        check_checkpoint_files(ckpt_dir)  # before any engine is touched
        load_engine_checkpoint(student_engine, f"{ckpt_dir}/student")
        load_engine_checkpoint(fake_engine, f"{ckpt_dir}/fake")
        if ema is not None and Path(ckpt_dir, EMA_FILE).exists():
            ema.load_state_dict(load_weights_only(Path(ckpt_dir, EMA_FILE), map_location=device))
        elif ema is not None and rank == 0:
            log.info("the checkpoint holds no student EMA: the average starts here")
    epoch, rows_done, note = data_position(state, digest, rank)
    if rank == 0:
        log.info(f"resumed from checkpoint at step {state['step']}" + (f"; {note}" if note else ""))
    return state["step"], epoch, rows_done, state.get("validation")


def checkpoint_state(cfg, step: int, position: list[int], world: int, workers: list[dict], digest: str,
                     chosen: dict | None) -> dict:
    """`state.json` of the checkpoint at `step` (rank 0 writes it), less the metrics; `position`
    is this rank's (epoch, rows of it done), gathered from every rank (a collective call)."""
    positions = [None] * world  # every rank's own place in its rows
    torch.distributed.all_gather_object(positions, position)
    return {"step": step, "epoch": position[0], "workers": workers, "data_plan": digest,
            "data_positions": positions, "validation": chosen, "trained_parameters": trained_parameters(cfg)}


def report_checkpoint(cfg, rank, student_engine, fake_engine, ema, metrics, adapter, nets, state) -> None:
    import ray.train

    if cfg.distill.export_at_checkpoints and state["step"] < cfg.distill.steps:
        # before the checkpoint: a restart from an earlier one exports this step again
        with averaged_student(ema, nets.student_parameters()):
            export_student(cfg, rank, student_engine, adapter, nets, final=False, step=state["step"])
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, rank, student_engine, fake_engine, ema, {**state, "metrics": metrics})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_checkpoint(folder: str, rank: int, student_engine, fake_engine, ema, state: dict) -> None:
    """This rank's part of a checkpoint in `folder`; rank 0 adds `state.json` and the EMA."""
    # exclude_frozen_parameters: the frozen base is the teacher, already on disk; checkpoints hold
    # only what training changes (adapters, head, or the sharded full student) plus optimizer state.
    student_engine.save_checkpoint(f"{folder}/student", tag=CKPT_TAG, exclude_frozen_parameters=True)
    fake_engine.save_checkpoint(f"{folder}/fake", tag=CKPT_TAG, exclude_frozen_parameters=True)
    if rank == 0:
        Path(folder, "state.json").write_text(json.dumps(state, indent=2))
        if ema is not None:  # the same on every rank (ZeRO <= 2 keeps whole student weights)
            torch.save(ema.state_dict(), Path(folder, EMA_FILE))
