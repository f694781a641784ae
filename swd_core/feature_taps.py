"""Image-token features after chosen transformer blocks, taken with forward hooks.

The fake-score network's block-k features feed the MMD loss and the GAN head. Hooks keep the
model's own forward untouched (no copied forward); `stop_after_last` ends the forward pass once
the deepest requested block has run, so a features-only call skips the remaining blocks, and
`only_rows_onward` lets only some samples go on past it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once the wanted features exist."""


@contextmanager
def tap_block_outputs(
    blocks: nn.ModuleList,
    indices: Sequence[int],
    select: Callable[[object], torch.Tensor],
    stop_after_last: bool = False,
) -> Iterator[dict[int, torch.Tensor]]:
    """Collect `select(output)` of `blocks[i]` for every i in `indices` into the yielded dict,
    filled as the forward pass inside the block runs; the hooks go when the block ends.

    Args:
        blocks (`nn.ModuleList`): the transformer's blocks.
        indices (`Sequence[int]`): the blocks to tap (order and repeats do not matter).
        select (`Callable[[object], torch.Tensor]`): picks the features out of a block's output
            (e.g. the image tokens of a joint block's (context, image) pair).
        stop_after_last (`bool`): raise `StopForward` once the deepest tapped block has run, so a
            features-only pass skips the rest (the caller catches it).

    Returns:
        `Iterator[dict[int, torch.Tensor]]`: a context manager yielding the features by block index.

    Raises:
        ValueError: an index outside the blocks.
    """
    indices = sorted(set(int(i) for i in indices))
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"feature blocks {bad} out of range: the transformer has {len(blocks)} blocks "
                         f"(0..{len(blocks) - 1})")
    captured: dict[int, torch.Tensor] = {}
    last = indices[-1] if indices else None
    handles = []

    def make_hook(i: int):
        def hook(_module, _inputs, output):
            captured[i] = select(output)
            if stop_after_last and i == last:
                raise StopForward

        return hook

    for i in indices:
        handles.append(blocks[i].register_forward_hook(make_hook(i)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def only_rows_onward(modules: Sequence[nn.Module], rows: int | None, batch: int) -> Iterator[None]:
    """Inside the block, `modules` (the blocks after a tapped one, then the output layers) see only
    the first `rows` of the `batch` samples: a forward pre-hook cuts every batch-first tensor
    argument. One call then gives features for all samples and velocities for the first `rows`
    (two passes that share the blocks up to the tap run as one, with half the kernel launches).
    Hand-written: a row-wise early exit is not a diffusers feature.

    Args:
        modules (`Sequence[nn.Module]`): the modules that see the cut batch.
        rows (`int`, *optional*): how many leading samples go on; None or at least `batch`: no cut.
        batch (`int`): the full batch size, to recognise batch-first tensors.

    Returns:
        `Iterator[None]`: a context manager; the hooks go when it ends.
    """
    if rows is None or rows >= batch:
        yield
        return

    def cut(t):
        return t[:rows] if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == batch else t

    def hook(_module, args, kwargs):
        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
