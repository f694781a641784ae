"""The generator loss's weights and noise ranges (`LossSettings`), with the algorithm's defaults.

Light to import (no torch): the pipeline schema offers these defaults in `distill.losses` and
builds the settings from the section.
"""

from __future__ import annotations

from dataclasses import dataclass

from swd_core.schedules import GRID_STEPS

MMD_KERNELS = ("linear", "rbf")


@dataclass(frozen=True)
class LossSettings:
    """Weights and noise ranges of the generator loss L = w_mmd·MMD + w_dmd·DMD + w_gan·GAN.

    The defaults are the algorithm's; a pipeline definition's `distill.losses` offers the same
    (`pipelines.schema.LossesConfig.settings` builds this from it). A weight of 0 removes the term
    and its network passes (MMD-only training runs no teacher). Ranges are [low, high) indices
    into the 28-step sigma grid. DMD runs only where the latent side is >= `dmd_min_scale`.

    Args:
        feature_block (`int`): the fake network's block whose features feed MMD and the GAN head.
        mmd_weight (`float`), mmd_kernel (`str`, one of `MMD_KERNELS`), mmd_c (`float`, the linear
            kernel's pseudo-Huber constant), rbf_bandwidth (`float`), mmd_range (`tuple[int, int]`):
            the MMD term.
        dmd_weight (`float`), guidance_scale (`float`, the teacher's CFG scale), dmd_range
            (`tuple[int, int]`, also the GAN term's), dmd_min_scale (`int`): the DMD term.
        gan_weight (`float`), discriminator_weight (`float`, in the fake-score update): the GAN terms.
        fake_range (`tuple[int, int]`): the fake-score update's noise range.
        grid (`tuple[float, ...]`, *optional*): the run's sigma grid the ranges index
            (`schedules.family_sigma_grid`); None: SD3's.
    """

    feature_block: int = 11
    mmd_weight: float = 1.0
    mmd_kernel: str = "linear"
    mmd_c: float = 1e-3
    rbf_bandwidth: float = 100.0
    mmd_range: tuple[int, int] = (18, 28)
    dmd_weight: float = 1.0
    guidance_scale: float = 7.0
    dmd_range: tuple[int, int] = (12, 28)
    dmd_min_scale: int = 0
    gan_weight: float = 5e-3
    discriminator_weight: float = 1e-2
    fake_range: tuple[int, int] = (0, GRID_STEPS)
    grid: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.mmd_kernel not in MMD_KERNELS:
            raise ValueError(f"mmd_kernel {self.mmd_kernel!r}: allowed {', '.join(map(repr, MMD_KERNELS))}")
        if self.mmd_weight == self.dmd_weight == self.gan_weight == 0:
            raise ValueError("all loss weights are 0: enable at least one of mmd, dmd, gan")
