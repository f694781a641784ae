"""The networks one worker trains and how they are optimized: the teacher with its adapters and
GAN head (`build_networks`), the DeepSpeed engines of the student and of the fake score
(`build_engines`), their learning-rate schedule, the loss settings, and the student's weight
average (EMA).

Layouts (distill.mode):
- "lora": one frozen base per worker carries the student and fake adapters (teacher = adapters
  off). Both engines hold only adapter (+ GAN head) parameters.
- "full": the student is its own transformer, sharded by the student engine under the
  definition's ZeRO stage (3 for large models); the teacher base carries the fake adapter.
The fake engine runs at ZeRO ≤ 2: its module holds the frozen base the teacher also uses.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from functools import partial

import torch

from pipelines.schema import PipelineConfig


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
    """The definition's `distill.losses` as `swd_core.training.LossSettings`, on the run's sigma grid."""
    from swd_core.schedules import family_sigma_grid

    # the grid the schedule's boundaries index: the loss ranges index the same one
    grid = family_sigma_grid(cfg.teacher.family, cfg.schedule().final_scale, cfg.teacher.resolved_patch_size)
    return cfg.distill.losses.settings(grid=tuple(grid.tolist()))


def build_networks(cfg: PipelineConfig, device: torch.device, separate_fake_base: bool = False):
    """Teacher pipeline + adapters + GAN head on `device`; returns (adapter, Networks).
    `separate_fake_base` reproduces the authors' two-copy layout (for bench/distill.py only)."""
    from swd_core.adapters import load_adapter
    from swd_core.gan_head import GANHead
    from swd_core.lora import FAKE, STUDENT, add_swd_adapters
    from swd_core.training import Networks

    t, d = cfg.teacher, cfg.distill
    # Training reads precomputed embeddings; only validation sampling encodes prompts.
    adapter = load_adapter(t.family, t.path, dtype=t.dtype, device=str(device),
                           max_sequence_length=t.max_sequence_length,
                           load_text_encoders=d.validation.num_prompts > 0)
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
    return adapter, Networks(adapter, head, d.losses.feature_block,
                             student_transformer=student, fake_transformer=fake_base)


def import_deepspeed():
    """`import deepspeed` without its optional mlflow import: DeepSpeed's autotuner imports mlflow
    when it is installed (it is, for the registry), 1 to 5 s in every training process here for a
    feature no run uses. mlflow stays importable afterwards."""
    if "deepspeed" in sys.modules:  # imported: hiding mlflow now could fail another thread's import
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: DeepSpeed goes on without it
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed


def build_engines(cfg: PipelineConfig, nets, micro_batch: int, bf16: bool):
    """DeepSpeed engines for the student and for the fake score + GAN head (ZeRO ≤ 2: its
    module holds the frozen base the teacher also uses)."""
    deepspeed = import_deepspeed()

    d = cfg.distill
    student_module = nets.student_transformer if not nets.lora_student else torch.nn.ModuleDict({"base": nets.base})
    student_engine, *_ = deepspeed.initialize(model=student_module, model_parameters=nets.student_parameters(),
                                              config=deepspeed_config(cfg, d.lr, d.zero_stage, micro_batch, bf16),
                                              lr_scheduler=lr_schedule(cfg, updates_per_step=1))
    fake_engine, *_ = deepspeed.initialize(model=torch.nn.ModuleDict({"base": nets.fake_base, "head": nets.head}),
                                           model_parameters=nets.fake_parameters(),
                                           config=deepspeed_config(cfg, d.fake_lr or d.lr, min(d.zero_stage, 2),
                                                                   micro_batch, bf16),
                                           lr_scheduler=lr_schedule(cfg, updates_per_step=d.fake_updates))
    return student_engine, fake_engine


def lr_schedule(cfg: PipelineConfig, updates_per_step: int):
    """optimizer -> LambdaLR with `swd_core.training.lr_factor` (DeepSpeed steps it with the
    optimizer and keeps its state in checkpoints); None when the rate is constant."""
    from swd_core.training import lr_factor

    d = cfg.distill
    if d.lr_decay_fraction == 0 or updates_per_step == 0:
        return None
    factor = partial(lr_factor, total=d.steps * updates_per_step, decay_fraction=d.lr_decay_fraction)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
