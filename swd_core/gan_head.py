"""The GAN discriminator head (DMD2-style) on the fake-score network's features."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GANHead(nn.Module):
    """4 × [LayerNorm, GELU, Linear] with widths linspace(dim → 1, 5), on token-mean-pooled
    block-k features of the fake-score network.

    Args:
        dim (`int`): feature width of the tapped transformer block.
    """

    def __init__(self, dim: int):
        super().__init__()
        widths = [int(round(w)) for w in np.linspace(dim, 1, 5)]  # Python rounding: 32.5 -> 32
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.LayerNorm(w_in), nn.GELU(), nn.Linear(w_in, w_out)]
        self.net = nn.Sequential(*layers)
        self.widths = widths

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Score samples as real or generated from their token features.

        Args:
            features (`torch.Tensor`): (B, N, C) token features of the tapped block.

        Returns:
            `torch.Tensor`: (B,) logits, float32.
        """
        # token mean in float32, then the head's own dtype (bf16 once DeepSpeed casts it); logits in float32
        pooled = features.float().mean(dim=1).to(self.net[-1].weight.dtype)
        return self.net(pooled).squeeze(-1).float()
