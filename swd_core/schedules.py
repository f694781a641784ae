"""Sigma grids and scale schedules for scale-wise sampling.

A scale-wise schedule pairs every sampling step with a latent side length ("scale") and a noise
level sigma. The sigmas are picked from the teacher's 28-step shift-3 flow-matching grid by grid
index ("boundaries"), so a schedule is fully described by `scales` + `boundaries` (or explicit
`sigmas` when a user wants values off the grid).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch loads on first use: the schema imports this module (see swd_core/lora.py)
    import torch

GRID_STEPS = 28
GRID_SHIFT = 3.0


def sigma_grid(num_steps: int = GRID_STEPS, shift: float = GRID_SHIFT) -> torch.Tensor:
    """The teacher's sigma grid (float32, `num_steps` values, no terminal 0).

    Taken from diffusers' `FlowMatchEulerDiscreteScheduler` so it matches what SD3 samples with
    (imported here: the pipeline schema imports this module, and diffusers takes a second to load).

    Args:
        num_steps (`int`): the grid's length.
        shift (`float`): the flow-matching shift.

    Returns:
        `torch.Tensor`: the sigmas, decreasing from 1.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas[:-1].to(torch.float32).clone()


# FLUX.1's scheduler shifts its sigmas by the image's token count (`mu`, diffusers' `calculate_shift`),
# with these values in both FLUX.1-dev's and FLUX.1-schnell's scheduler_config.json.
FLUX_SHIFT = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def flux_sigma_grid(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The sigmas stock `FluxPipeline` samples an image of `image_seq_len` tokens with (float32,
    `num_steps` values, no terminal 0): linspace(1, 1/n) shifted by mu(tokens).

    Args:
        num_steps (`int`): the grid's length.
        image_seq_len (`int`): the image's token count, (latent side / patch size)².

    Returns:
        `torch.Tensor`: the sigmas, decreasing from 1.
    """
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from swd_core.pretrained import use_pil_image_processors

    use_pil_image_processors()
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, FLUX_SHIFT["base_image_seq_len"], FLUX_SHIFT["max_image_seq_len"],
                         FLUX_SHIFT["base_shift"], FLUX_SHIFT["max_shift"])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **FLUX_SHIFT)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas[:-1].to(torch.float32).clone()


def family_sigma_grid(family: str, final_scale: int, patch_size: int = 2, num_steps: int = GRID_STEPS) -> torch.Tensor:
    """The one sigma grid of a run: schedule boundaries index it, and the DMD, MMD and fake-score
    noise levels are drawn from it, at every scale. SD3: the 28-step shift-3 grid. FLUX: the grid
    stock FLUX.1 samples the *final* resolution with (its token-count shift at the last scale), so
    the teacher is asked at the sigmas it was trained to sample the target size at, and a step's
    sigma does not change with the scale the student happens to be at (SwD's schedules fix
    one sigma per step). The smaller scales see the same values, as they do with SD3.

    Args:
        family (`str`): "sd3" or "flux".
        final_scale (`int`): the schedule's last latent side; `patch_size` (`int`): the
            transformer's (FLUX's token count).
        num_steps (`int`): the grid's length.

    Returns:
        `torch.Tensor`: the sigmas (float32).
    """
    if family == "sd3":
        return sigma_grid(num_steps)
    if family == "flux":
        return flux_sigma_grid(num_steps, (final_scale // patch_size) ** 2)
    raise ValueError(f"model family {family!r} has no sigma grid; allowed: ['flux', 'sd3']")


def boundaries_to_sigmas(boundaries: Sequence[int], grid: torch.Tensor | None = None) -> list[float]:
    """Grid indices -> sigmas, e.g. [0, 7, 14, 18] -> [1.0, 0.8959, 0.7371, 0.6022].

    Args:
        boundaries (`Sequence[int]`): indices into `grid`.
        grid (`torch.Tensor`, *optional*): the sigma grid; None: SD3's (`sigma_grid()`).

    Returns:
        `list[float]`: one sigma per index.
    """
    grid = sigma_grid() if grid is None else grid
    bad = [b for b in boundaries if not 0 <= int(b) < len(grid)]
    if bad:
        raise ValueError(f"boundaries {list(boundaries)}: indices {bad} are outside the {len(grid)}-step grid "
                         f"[0, {len(grid) - 1}]")
    return [float(grid[int(b)]) for b in boundaries]


@dataclass(frozen=True)
class ScaleSchedule:
    """A scale-wise sampling schedule.

    Args:
        scales (`tuple[int]`): latent side length at each step; non-decreasing.
        sigmas (`tuple[float]`): noise level at each step (the first is usually 1.0); strictly decreasing, in (0, 1].
        boundaries (`tuple[int]`, *optional*): the grid indices the sigmas came from, kept for display.
        patch_size (`int`, *optional*): the transformer's patch size; every scale must be divisible by it.
    """

    scales: tuple[int, ...]
    sigmas: tuple[float, ...]
    boundaries: tuple[int, ...] | None = None
    patch_size: int | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        if self.boundaries is not None:
            object.__setattr__(self, "boundaries", tuple(int(b) for b in self.boundaries))
            if len(self.boundaries) != len(self.scales):
                raise ValueError(f"boundaries: need one grid index per scale ({len(self.scales)} scales), "
                                 f"got {list(self.boundaries)}")
        validate_schedule(self.scales, self.sigmas, self.patch_size)

    @classmethod
    def from_boundaries(cls, scales: Sequence[int], boundaries: Sequence[int], patch_size: int | None = None,
                        grid: torch.Tensor | None = None) -> "ScaleSchedule":
        """A schedule whose sigmas are read off a grid, as the paper's schedules are stated.

        Args:
            scales (`Sequence[int]`): latent side length at each step.
            boundaries (`Sequence[int]`): one index into `grid` per step.
            patch_size (`int`, *optional*): the transformer's patch size.
            grid (`torch.Tensor`, *optional*): the sigma grid; None: SD3's (`sigma_grid()`).

        Returns:
            `ScaleSchedule`: with `boundaries` kept for display.
        """
        if len(boundaries) != len(scales):
            raise ValueError(f"boundaries: need one grid index per scale ({len(scales)} scales), "
                             f"got {len(boundaries)}: {list(boundaries)}")
        return cls(tuple(scales), tuple(boundaries_to_sigmas(boundaries, grid)), tuple(boundaries), patch_size)

    @property
    def num_steps(self) -> int:
        """Sampling steps: one per scale."""
        return len(self.scales)

    @property
    def final_scale(self) -> int:
        """The last step's latent side: the output's."""
        return self.scales[-1]

    @property
    def is_scalewise(self) -> bool:
        """Whether the scale grows (False for a constant-scale, full-resolution schedule)."""
        return self.scales[0] != self.scales[-1]

    def full_resolution(self) -> "ScaleSchedule":
        """The same sigmas with every step at the final scale: the full-resolution few-step baseline.

        Returns:
            `ScaleSchedule`
        """
        return ScaleSchedule((self.final_scale,) * self.num_steps, self.sigmas, self.boundaries, self.patch_size)

    def sigmas_tensor(self) -> torch.Tensor:
        """The sigmas as a float32 tensor.

        Returns:
            `torch.Tensor`: (num_steps,).
        """
        import torch

        # float32 like diffusers' schedulers, so timesteps (sigma * 1000) match stock sampling bit for bit.
        return torch.tensor(self.sigmas, dtype=torch.float32)

    def scale_factors(self) -> list[float]:
        """Upscale factors relative to the first scale, one per transition: what
        diffusers' `FlowMatchLCMScheduler.set_scale_factors` expects.

        Returns:
            `list[float]`: num_steps - 1 factors.
        """
        return [s / self.scales[0] for s in self.scales[1:]]

    def describe(self, vae_scale_factor: int | None = None) -> list[str]:
        """The schedule for people: one line per step with its scale, sigma, timestep and grid index.

        Args:
            vae_scale_factor (`int`, *optional*): pixels per latent cell, to show each scale in pixels.

        Returns:
            `list[str]`: one line per step.
        """
        lines = []
        for i, (s, sigma) in enumerate(zip(self.scales, self.sigmas)):
            px = f" ({s * vae_scale_factor}px)" if vae_scale_factor else ""
            grid = f"  grid[{self.boundaries[i]}]" if self.boundaries else ""
            lines.append(f"step {i}: scale {s}{px}  sigma {sigma:.4f}  t {sigma * 1000:.1f}{grid}")
        return lines


def validate_schedule(scales: Sequence[int], sigmas: Sequence[float], patch_size: int | None = None) -> None:
    """Check a schedule: at least one step, one sigma per positive, non-decreasing scale, sigmas
    strictly decreasing in (0, 1], every scale a multiple of the patch size.

    Args:
        scales (`Sequence[int]`): latent side length at each step.
        sigmas (`Sequence[float]`): noise level at each step.
        patch_size (`int`, *optional*): the transformer's patch size; None or 0: not checked.

    Raises:
        ValueError: the first problem found, naming the offending values.
    """
    if len(scales) == 0:
        raise ValueError("scales: need at least one scale")
    if len(sigmas) != len(scales):
        raise ValueError(f"sigmas: need exactly one sigma per scale ({len(scales)} scales {list(scales)}), "
                         f"got {len(sigmas)}: {list(sigmas)}")
    if any(s <= 0 for s in scales):
        raise ValueError(f"scales {list(scales)}: every scale must be a positive latent side length")
    for i in range(1, len(scales)):
        if scales[i] < scales[i - 1]:
            raise ValueError(f"scales {list(scales)}: must be non-decreasing, "
                             f"but step {i} ({scales[i]}) < step {i - 1} ({scales[i - 1]})")
    if any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"sigmas {list(sigmas)}: every sigma must lie in (0, 1]")
    for i in range(1, len(sigmas)):
        if sigmas[i] >= sigmas[i - 1]:
            raise ValueError(f"sigmas {list(sigmas)}: must be strictly decreasing, "
                             f"but step {i} ({sigmas[i]}) >= step {i - 1} ({sigmas[i - 1]})")
    if patch_size:
        bad = [s for s in scales if s % patch_size]
        if bad:
            raise ValueError(f"scales {list(scales)}: {bad} not divisible by the transformer patch size {patch_size}")


# Published schedules (paper v2 / authors' release) and the toy ones.
PRESETS: dict[str, dict[str, list[int]]] = {
    "sd35_medium_6step": {"scales": [32, 48, 64, 80, 96, 128], "boundaries": [0, 4, 7, 12, 14, 18]},
    "sd35_medium_4step": {"scales": [64, 80, 96, 128], "boundaries": [0, 7, 14, 18]},
    "sd35_large_4step": {"scales": [64, 80, 96, 128], "boundaries": [0, 7, 14, 18]},
    # SD3.5 Large's scales and grid indices; the indices pick from FLUX's grid (`family_sigma_grid`)
    "flux1_dev_4step": {"scales": [64, 80, 96, 128], "boundaries": [0, 7, 14, 18]},
    "toy_4step": {"scales": [8, 10, 12, 16], "boundaries": [0, 7, 14, 18]},
    "toy_6step": {"scales": [4, 6, 8, 10, 12, 16], "boundaries": [0, 4, 7, 12, 14, 18]},
}


def preset(name: str, patch_size: int | None = None, grid: torch.Tensor | None = None) -> ScaleSchedule:
    """A named schedule of `PRESETS` (scales and grid indices) on `grid` (None: SD3's).

    Args:
        name (`str`): a key of `PRESETS`, e.g. "sd35_medium_6step".
        patch_size (`int`, *optional*): the transformer's, checked against the scales.
        grid (`torch.Tensor`, *optional*): the sigma grid the boundaries index.

    Returns:
        `ScaleSchedule`
    """
    if name not in PRESETS:
        raise ValueError(f"schedule preset {name!r} is unknown; allowed: {sorted(PRESETS)}")
    p = PRESETS[name]
    return ScaleSchedule.from_boundaries(p["scales"], p["boundaries"], patch_size, grid)


def sample_grid_sigmas(batch: int, low: int, high: int, generator: torch.Generator | None = None,
                       grid: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmas at grid indices drawn uniformly from [low, high), one per sample (training-time noise levels).

    Args:
        batch (`int`): samples.
        low (`int`), high (`int`): the index range [low, high) into `grid`.
        generator (`torch.Generator`, *optional*): the CPU generator of the draw.
        grid (`torch.Tensor`, *optional*): the sigma grid; None: SD3's.

    Returns:
        `torch.Tensor`: (batch,) sigmas.
    """
    grid = sigma_grid() if grid is None else grid
    if not 0 <= low < high <= len(grid):
        raise ValueError(f"grid index range [{low}, {high}) must lie within [0, {len(grid)}]")
    import torch

    idx = torch.randint(low, high, (batch,), generator=generator)
    return grid[idx]
