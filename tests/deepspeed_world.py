"""Real DeepSpeed engines without Ray: a one-process world on gloo (CPU), as bench/distill.py
runs, and small networks shaped as `build_engines` reads `Networks`."""

import importlib
import os
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from pipelines.schema import parse_pipeline_config
from tests.ray_nodes import free_port


def config(tmp_path, **distill):
    return parse_pipeline_config({"name": "gc", "teacher": {"path": "builtin:toy-sd3", "max_sequence_length": 0},
                                  "distill": {"schedule": {"preset": "toy_4step"}, **distill},
                                  "resources": {"storage": str(tmp_path)}})


def tiny_nets(seed=0):
    """What `build_engines` reads of `Networks`: a full student, a fake base and a GAN head."""
    torch.manual_seed(seed)
    student, fake, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    return SimpleNamespace(lora_student=False, student_transformer=student, base=None, fake_base=fake, head=head,
                           student_parameters=lambda: list(student.parameters()),
                           fake_parameters=lambda: [*fake.parameters(), *head.parameters()])


# What DeepSpeed reads of a launcher's environment while it builds engines
WORLD_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


@contextmanager
def one_process_world():
    """deepspeed.init_distributed on gloo with a world of one, for the whole session: DeepSpeed
    keeps its groups after the process group is destroyed, so a second world in the same process
    would fail. Tests building engines set `WORLD_ENV` while they run (the `deepspeed_world`
    fixture), so later subprocesses inherit none of it."""
    import deepspeed

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would give torch itself

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**WORLD_ENV, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}.items():
            mp.setenv(key, value)
        # DeepSpeed compiles a shared-memory all-reduce op for CPU on first use (about a minute on a
        # fresh machine); a world of one never all-reduces through it
        if hasattr(ds_torch, "build_shm_op"):
            mp.setattr(ds_torch, "build_shm_op", lambda: None)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, rank=0, world_size=1,
                                   init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def train_steps(student_engine, fake_engine, x, steps: int, ema=None, params=None) -> None:
    """`steps` optimizer steps of both engines on the batch `x` (and of the EMA over `params`)."""
    for _ in range(steps):
        student_engine.backward(student_engine(x).pow(2).mean())
        student_engine.step()
        fake_engine.backward(fake_engine.module["head"](fake_engine.module["base"](x)).pow(2).mean())
        fake_engine.step()
        if ema is not None:
            ema.step(params)


def trained_checkpoint(cfg, folder, steps: int = 2):
    """Engines of `tiny_nets` trained `steps` steps and checkpointed into `folder` as the distill
    stage writes one (state.json: step `steps`, 8 rows of epoch 0 done, data plan "plan").
    Returns (nets, student_engine, fake_engine, ema, x)."""
    from pipelines.stages.distill.checkpoint import checkpoint_state, write_checkpoint
    from pipelines.stages.distill.engines import build_engines, student_ema

    nets = tiny_nets()
    student_engine, fake_engine = build_engines(cfg, nets, 4, bf16=False)
    ema = student_ema(cfg, nets)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    train_steps(student_engine, fake_engine, x, steps, ema, nets.student_parameters())
    state = checkpoint_state(cfg, steps, [0, 8], 1, [], "plan", None)
    write_checkpoint(str(folder), 0, student_engine, fake_engine, ema, {**state, "metrics": {}})
    return nets, student_engine, fake_engine, ema, x
