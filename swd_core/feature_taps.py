"""Image-token features after chosen transformer blocks, taken with forward hooks.

The fake-score network's block-k features feed the MMD loss and the GAN head. Hooks keep the
model's own forward untouched (no copied forward); `stop_after_last` ends the forward pass once
the deepest requested block has run, so a features-only call skips the remaining blocks.
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
    """Collect `select(output)` of `blocks[i]` for every i in `indices` into the yielded dict."""
    indices = sorted(set(int(i) for i in indices))
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"feature blocks {bad} out of range: the transformer has {len(blocks)} blocks (0..{len(blocks) - 1})")
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
