"""Student and fake-score LoRA adapters on one shared frozen base.

The teacher, the student and the fake-score network are three views of one transformer:
teacher = adapters disabled, student = the "student" adapter, fake = the "fake" adapter.
The base weights exist once per worker, instead of the two full copies of the authors' code.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # torch and peft load on first use: the schema imports this module, and so does
    # every process that reads a definition (a lease holder, a CLI command, a Ray Train controller)
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch import nn

STUDENT = "student"
FAKE = "fake"
TEACHER = "teacher"
ROLES = (TEACHER, STUDENT, FAKE)
# Attention projections and both MLPs of every block: the image stream's `ff` and the text
# stream's `ff_context` (the authors suffix-match `net.0.proj` / `net.2`, which takes both).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                   "ff_context.net.0.proj", "ff_context.net.2")


def lora_config(rank: int = 64, alpha: float | None = None, targets: Sequence[str] = DEFAULT_TARGETS) -> LoraConfig:
    """LoRA with alpha = rank and gaussian init by default (B = 0, so a fresh adapter is the teacher).

    Args:
        rank (`int`): the LoRA rank.
        alpha (`float`, *optional*): the scale numerator (scale alpha / rank); None: rank.
        targets (`Sequence[str]`): names of the linear layers that get adapters.

    Returns:
        `peft.LoraConfig`
    """
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                      target_modules=list(targets), init_lora_weights="gaussian")


def add_swd_adapters(transformer: nn.Module, rank: int = 64, alpha: float | None = None,
                     targets: Sequence[str] = DEFAULT_TARGETS, names: Sequence[str] = (STUDENT, FAKE)) -> None:
    """Freeze the base and add a student and a fake-score adapter (diffusers' peft integration).
    Full fine-tuning keeps the student as its own module and passes `names=(FAKE,)`.

    Args:
        transformer (`nn.Module`): the teacher's diffusers transformer.
        rank (`int`), alpha (`float`, *optional*), targets (`Sequence[str]`): as `lora_config`.
        names (`Sequence[str]`): the adapters to add, of `STUDENT` and `FAKE`.
    """
    bad = [n for n in names if n not in (STUDENT, FAKE)]
    if bad or not names:
        raise ValueError(f"adapter names {list(names)}: each must be one of {[STUDENT, FAKE]}")
    transformer.requires_grad_(False)
    with warnings.catch_warnings():
        # peft warns that a second adapter is being added; two adapters is the point here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in names:
            transformer.add_adapter(lora_config(rank, alpha, targets), adapter_name=name)
    for name in names:
        set_trainable(transformer, name, True)


def lora_layers(transformer: nn.Module) -> list[BaseTunerLayer]:
    """Every peft LoRA layer of `transformer`.

    Args:
        transformer (`nn.Module`): a transformer with SwD adapters.

    Returns:
        `list[BaseTunerLayer]`: in module order.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(transformer: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA parameters of one adapter.

    Args:
        transformer (`nn.Module`): a transformer with SwD adapters.
        adapter (`str`): `STUDENT` or `FAKE`.

    Returns:
        `list[nn.Parameter]`
    """
    return [p for n, p in transformer.named_parameters() if f".{adapter}." in n and "lora_" in n]


def base_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The frozen base's parameters (everything but the LoRA ones).

    Args:
        transformer (`nn.Module`): a transformer with SwD adapters.

    Returns:
        `list[nn.Parameter]`
    """
    return [p for n, p in transformer.named_parameters() if "lora_" not in n]


def set_trainable(transformer: nn.Module, adapter: str, trainable: bool) -> None:
    """Set `requires_grad` of one adapter's parameters.

    Args:
        transformer (`nn.Module`): a transformer with SwD adapters.
        adapter (`str`): `STUDENT` or `FAKE`.
        trainable (`bool`): the new `requires_grad`.
    """
    for p in adapter_parameters(transformer, adapter):
        p.requires_grad_(trainable)


@contextmanager
def use_role(transformer: nn.Module, role: str) -> Iterator[None]:
    """Run the shared transformer as the teacher, the student or the fake-score network.

    The trainer switches roles about twenty times per iteration, so this sets the two flags that a
    LoRA layer's forward reads (`disable_adapters`, `active_adapters`) on a cached list of layers.
    peft's own `set_adapter` / `enable_adapters` would also walk every adapter parameter to flip
    `requires_grad` (which the trainer owns, so it would then have to be restored): 0.24 s of
    host time per fake-score update on an SD3.5-Medium-wide model, the floor of an iteration on
    a GPU (bench/results/distill_medium_cuda.json).

    Args:
        transformer (`nn.Module`): a transformer with SwD adapters.
        role (`str`): `TEACHER` (adapters off), `STUDENT` or `FAKE`.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is unknown; allowed: {list(ROLES)}")
    layers = _cached_lora_layers(transformer)
    if not layers:
        raise ValueError("the transformer has no LoRA adapters; call add_swd_adapters first")
    previous = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
    for layer in layers:
        layer._disable_adapters = role == TEACHER
        if role != TEACHER:
            layer._active_adapter = [role]
    try:
        yield
    finally:
        for layer, (disabled, active) in zip(layers, previous):
            layer._disable_adapters, layer._active_adapter = disabled, active


_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list]]" = weakref.WeakKeyDictionary()


def _cached_lora_layers(transformer: nn.Module) -> list[BaseTunerLayer]:
    """`lora_layers`, walked again only when the adapters change (diffusers' `add_adapter`,
    `delete_adapters` and `unload_lora` all update the model's `peft_config`)."""
    key = tuple(getattr(transformer, "peft_config", None) or ())
    hit = _LAYER_CACHE.get(transformer)
    if hit is None or hit[0] != key:
        hit = (key, lora_layers(transformer))
        _LAYER_CACHE[transformer] = hit
    return hit[1]
