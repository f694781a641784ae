"""The stage's Ray Train checkpoints: each holds both DeepSpeed engines' checkpoints (tag
`CKPT_TAG`, only what training changes), the student's EMA (`EMA_FILE`) and `state.json`: the
step, every rank's data position under the run's data plan, where the workers ran, the
validation choice, what the trained parameters are (mode, LoRA rank and targets) and the step's
metrics."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipelines.stages.distill.data import _data_position
from pipelines.stages.distill.engines import averaged_student
from pipelines.stages.distill.export import _export_student

CKPT_TAG = "ckpt"  # DeepSpeed checkpoint tag inside each Ray checkpoint
EMA_FILE = "student_ema.pt"  # the student's weight average (distill.ema_decay), beside state.json


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


def restore_checkpoint(cfg, rank: int, engine_g, engine_f, ema, device, digest: str,
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
            print(f"[distill] warm start from {warm_start}", flush=True)
    if not checkpoint:
        return 0, 0, 0, None
    with checkpoint.as_directory() as ckpt_dir:
        state = json.loads(Path(ckpt_dir, "state.json").read_text())
        saved, wanted = state.get("trained_parameters"), trained_parameters(cfg)
        if saved is not None and saved != wanted:
            differ = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in wanted.items() if saved.get(k) != v)
            raise ValueError(f"the checkpoint of run {cfg.name!r} trained other parameters than the definition asks "
                             f"for ({differ}): give the run another `name`, or set distill back to the checkpoint's")
        engine_g.load_checkpoint(f"{ckpt_dir}/student", tag=CKPT_TAG, load_module_strict=False)
        engine_f.load_checkpoint(f"{ckpt_dir}/fake", tag=CKPT_TAG, load_module_strict=False)
        if ema is not None and Path(ckpt_dir, EMA_FILE).exists():
            ema.load_state_dict(torch.load(Path(ckpt_dir, EMA_FILE), map_location=device, weights_only=True))
        elif ema is not None and rank == 0:
            print("[distill] the checkpoint holds no student EMA: the average starts here", flush=True)
    epoch, rows_done, note = _data_position(state, digest, rank)
    if rank == 0:
        print(f"[distill] resumed from checkpoint at step {state['step']}" + (f"; {note}" if note else ""), flush=True)
    return state["step"], epoch, rows_done, state.get("validation")


def checkpoint_state(cfg, step: int, position: list[int], world: int, workers: list[dict], digest: str,
                     chosen: dict | None) -> dict:
    """`state.json` of the checkpoint at `step` (rank 0 writes it), less the metrics; `position`
    is this rank's (epoch, rows of it done), gathered from every rank (a collective call)."""
    positions = [None] * world  # every rank's own place in its rows
    torch.distributed.all_gather_object(positions, position)
    return {"step": step, "epoch": position[0], "workers": workers, "data_plan": digest,
            "data_positions": positions, "validation": chosen, "trained_parameters": trained_parameters(cfg)}


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
