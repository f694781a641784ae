"""One SwD training iteration as plain tensor math; no Ray, no DeepSpeed.

The trainer (pipelines/stages/distill/) owns data, engines and optimizers and reads top to
bottom, at one scale s_i per iteration: `student_samples` (one call for all fake updates) ->
`fake_update_loss` × fake_updates -> backward/step, then `student_input` -> student pass ->
`generator_loss` -> backward/step. The critic comes first so that the one judging the student
at s_i has just been fitted to its samples at s_i. This module only says what each computes.

Three networks, two layouts:
- LoRA mode: teacher, student and fake score are roles of one transformer (one frozen base,
  a "student" and a "fake" adapter).
- Full fine-tuning: the student is its own transformer; teacher and fake share the other one.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from swd_core.adapters.base import FamilyAdapter, TextEmbeddings
from swd_core.gan_head import GANHead
from swd_core.lora import FAKE, STUDENT, TEACHER, adapter_parameters, use_role
from swd_core.loss_settings import LossSettings
from swd_core.losses import dmd_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss, mmd_linear, mmd_rbf
from swd_core.scale_ops import add_noise, upscale_latents, x0_from_velocity
from swd_core.schedules import ScaleSchedule, sample_grid_sigmas


class Networks:
    """Teacher, student and fake-score views plus the GAN head.

    Args:
        adapter: the family adapter of the teacher pipeline; its transformer carries the LoRA
            adapters (`swd_core.lora.add_swd_adapters`).
        head: the GAN head on the fake network's block-`feature_block` features.
        student_transformer: full fine-tuning only — the student's own transformer. `None` means
            LoRA mode (the student is the "student" adapter on the shared base).
        fake_transformer: the authors' layout, kept for memory comparisons (bench/distill.py):
            the fake adapter on its own copy of the base. `None`: the shared base carries it.
    """

    def __init__(self, adapter: FamilyAdapter, head: GANHead, feature_block: int,
                 student_transformer: nn.Module | None = None, fake_transformer: nn.Module | None = None):
        self.adapter = adapter
        self.head = head
        self.feature_block = int(feature_block)
        self.lora_student = student_transformer is None
        # the same adapter code (text, VAE, hooks) calling a different transformer
        self._student = adapter if self.lora_student else _with_transformer(adapter, student_transformer)
        self._fake = adapter if fake_transformer is None else _with_transformer(adapter, fake_transformer)

    @property
    def base(self) -> nn.Module:
        """The teacher's transformer (in LoRA mode it carries the student and fake adapters)."""
        return self.adapter.transformer

    @property
    def fake_base(self) -> nn.Module:
        """The transformer that carries the fake adapter."""
        return self._fake.transformer

    @property
    def student_transformer(self) -> nn.Module:
        """The transformer the student runs on (the shared base in LoRA mode)."""
        return self._student.transformer

    def student_parameters(self) -> list[nn.Parameter]:
        """What the generator update trains: the student adapter, or the student's whole transformer."""
        if self.lora_student:
            return adapter_parameters(self.base, STUDENT)
        return list(self.student_transformer.parameters())

    def fake_parameters(self) -> list[nn.Parameter]:
        """What the fake-score update trains: the fake adapter and the GAN head."""
        return adapter_parameters(self.fake_base, FAKE) + list(self.head.parameters())

    def student(self, x: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        """The student's velocity at (x, σ) under `text`, in float32, with its graph."""
        with self.student_sampler() as student:
            return student.velocity(x, sigma, text)[0].float()

    @contextmanager
    def student_sampler(self) -> Iterator[FamilyAdapter]:
        """The student as an adapter for the samplers (`swd_core.generate`): text encoder, VAE and
        the student's transformer (or the shared base with the student adapter on)."""
        with use_role(self.base, STUDENT) if self.lora_student else nullcontext():
            yield self._student

    @torch.no_grad()
    def teacher_cfg(self, x: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings, uncond: TextEmbeddings,
                    guidance: float) -> torch.Tensor:
        """The teacher's guided velocity: CFG, v_uncond + w (v_cond − v_uncond), in one batched call
        (SD3), or the guidance embedding of a guidance-distilled FLUX. No gradient.

        Args:
            x (`torch.Tensor`): (B, C, s, s) noisy latents; `sigma` (`torch.Tensor`): their σ (B,).
            text (`TextEmbeddings`): the batch's prompts; `uncond`: the empty prompt's.
            guidance (`float`): w.

        Returns:
            `torch.Tensor`: the guided velocity, shaped like `x`.
        """
        with use_role(self.base, TEACHER):
            return self.adapter.guided_velocity(x, sigma, text, uncond, guidance)

    def fake(self, x: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings, features_only: bool = False,
             velocity_rows: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The fake score's pass, with its features at block `feature_block`.

        Args:
            x (`torch.Tensor`): (B, C, s, s) noisy latents; `sigma` (`torch.Tensor`): their σ (B,).
            text (`TextEmbeddings`): the batch's prompts.
            features_only (`bool`): stop after the tapped block (no velocity).
            velocity_rows (`int`, *optional*): only the first n samples go on to a velocity.

        Returns:
            `tuple`: (velocity in float32 or None, block features (B, N, C)).
        """
        with use_role(self.fake_base, FAKE):
            v, feats = self._fake.velocity(x, sigma, text, (self.feature_block,), features_only=features_only,
                                           velocity_rows=velocity_rows)
        return (None if v is None else v.float()), feats[self.feature_block]


def _with_transformer(adapter: FamilyAdapter, transformer: nn.Module) -> FamilyAdapter:
    view = copy.copy(adapter)
    view.transformer = transformer
    return view


@contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """requires_grad False inside the block, restored after: gradients pass *through* these
    parameters to earlier ones but never land in them (and DeepSpeed never sees a gradient
    for an engine that is not stepping; github.com/microsoft/DeepSpeed/issues/4923).

    Args:
        params (`Iterable[nn.Parameter]`): the parameters to freeze, e.g. `Networks.fake_parameters()`.
    """
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def lr_factor(update: int, total: int, decay_fraction: float) -> float:
    """Learning-rate multiplier after `update` optimizer steps of `total`: 1, then a linear fall to 0
    over the last `decay_fraction` of them (a stable final iterate for short runs).

    Args:
        update (`int`): optimizer steps taken; `total` (`int`): the run's.
        decay_fraction (`float`): the share of `total` the fall takes; <= 0: constant.

    Returns:
        `float`: the factor in [0, 1].
    """
    start = total * (1.0 - decay_fraction)
    if decay_fraction <= 0 or update < start:
        return 1.0
    return max(0.0, (total - update) / (total - start))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor moved without stalling the GPU: a plain copy from pageable memory waits for
    every queued kernel (about 20 such waits per iteration); from pinned memory it is queued."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _randn(shape, rng: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Noise drawn from a CPU generator, then moved: the same numbers on every device, so a run's
    noise does not depend on where it trains (and resumes exactly)."""
    return _to_device(torch.randn(shape, generator=rng), device)


def _noised_at(like: torch.Tensor, grid_range: tuple[int, int], rng: torch.Generator | None,
               grid: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ per sample at indices of `grid` uniform in `grid_range`, ε shaped like `like`), on its
    device; σ is drawn first, then ε, from the one `rng`."""
    grid = None if grid is None else torch.tensor(grid, dtype=torch.float32)
    sigma = _to_device(sample_grid_sigmas(like.shape[0], *grid_range, generator=rng, grid=grid), like.device)
    return sigma, _randn(like.shape, rng, like.device)


def student_input(latents: dict[int, torch.Tensor], schedule: ScaleSchedule, i: int,
                  rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's input at step i (shared by the batch): pure noise at s_0 for i = 0 (as at
    inference), else (1−σ_i)·bicubic(z_{i−1}, s_i) + σ_i·ε from the real latents at s_{i−1}.

    Args:
        latents (`dict[int, torch.Tensor]`): the batch's real latents by scale (side).
        schedule (`ScaleSchedule`): the student's scales and sigmas.
        i (`int`): the step.
        rng (`torch.Generator`, *optional*): the CPU generator ε is drawn from.

    Returns:
        `tuple`: (x at s_i, σ_i per sample).
    """
    s_i = schedule.scales[i]
    first = next(iter(latents.values()))
    batch, channels = first.shape[:2]
    eps = _randn((batch, channels, s_i, s_i), rng, first.device)
    sigma = torch.full((batch,), float(schedule.sigmas[i]), device=first.device)
    if i == 0:
        return eps, sigma
    z_prev = latents[schedule.scales[i - 1]].float()
    return add_noise(upscale_latents(z_prev, s_i), eps, sigma), sigma


def student_samples(nets: Networks, batches: list[tuple[TextEmbeddings, dict[int, torch.Tensor]]],
                    schedule: ScaleSchedule, i: int, rng: torch.Generator | None = None) -> list[torch.Tensor]:
    """The student's clean predictions x0 at step i for several (text, latents) batches, from one
    transformer call over all of them (fewer, larger kernels than a call per batch). Inputs are
    drawn batch by batch, as `student_input` would one at a time.

    Args:
        nets (`Networks`): the student among them.
        batches (`list`): (text, {scale: latents}) per batch.
        schedule (`ScaleSchedule`), i (`int`), rng (`torch.Generator`, *optional*): as `student_input`.

    Returns:
        `list[torch.Tensor]`: x0 per batch, in order, with the graph of the call (if any).
    """
    if not batches:
        return []
    inputs = [student_input(latents, schedule, i, rng) for _, latents in batches]
    x = torch.cat([x for x, _ in inputs])
    sigma = torch.cat([sigma for _, sigma in inputs])
    text = TextEmbeddings.cat([t.expand(len(x_b)) for (t, _), (x_b, _) in zip(batches, inputs)])
    x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
    return list(x0.split([len(x_b) for x_b, _ in inputs]))


def generator_loss(nets: Networks, x0: torch.Tensor, z_real: torch.Tensor, text: TextEmbeddings,
                   uncond: TextEmbeddings, settings: LossSettings,
                   rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's loss L = w_mmd·MMD + w_dmd·DMD + w_gan·GAN on its clean prediction x0 at scale s_i.

    Call inside `frozen(nets.fake_parameters())`: gradients reach the student through the fake
    network's features, never the fake network itself.

    Args:
        nets (`Networks`): the teacher, student and fake-score views.
        x0 (`torch.Tensor`): the student's clean prediction (B, C, s_i, s_i), with its graph.
        z_real (`torch.Tensor`): the real latents at s_i.
        text (`TextEmbeddings`): the batch's prompts; `uncond`: the empty prompt's, for CFG.
        settings (`LossSettings`): the weights and noise ranges; a weight of 0 skips its term and
            its passes.
        rng (`torch.Generator`, *optional*): the CPU generator of the iteration's noise.

    Returns:
        `tuple`: (the loss, its logged terms): the terms are detached 0-dim tensors; reading them
        (`logged_floats`) waits for the GPU, so the trainer does it once per iteration.
    """
    dmd_weight = settings.dmd_weight if x0.shape[-1] >= settings.dmd_min_scale else 0.0
    fake = _generator_fake_passes(nets, x0, z_real, text, settings, dmd_weight > 0, rng)
    total = x0.new_zeros(())
    terms: dict[str, torch.Tensor] = {}

    # MMD: the real and generated latents' features, at the same noise
    if settings.mmd_weight > 0:
        if settings.mmd_kernel == "linear":
            mmd = mmd_linear(fake.real_features, fake.mmd_features, settings.mmd_c)
        else:
            mmd = mmd_rbf(fake.real_features, fake.mmd_features, settings.rbf_bandwidth)
        total = total + settings.mmd_weight * mmd
        terms["mmd"] = mmd.detach()

    # DMD: the teacher's guided denoising of x_t against the fake score's
    if dmd_weight > 0:
        x_t, sigma = fake.x_t.detach(), fake.sigma
        v_teacher = nets.teacher_cfg(x_t, sigma, text, uncond, settings.guidance_scale)
        x0_teacher = x0_from_velocity(x_t, v_teacher, sigma)
        x0_fake = x0_from_velocity(x_t, fake.velocity.detach(), sigma)
        dmd = dmd_loss(x0, x0_teacher, x0_fake)
        total = total + dmd_weight * dmd
        terms["dmd"] = dmd.detach()

    # GAN: the head's verdict on the fake network's features of x_t
    if settings.gan_weight > 0:
        gan = gan_generator_loss(nets.head(fake.features))
        total = total + settings.gan_weight * gan
        terms["gan_g"] = gan.detach()

    terms["generator"] = total.detach()
    return total, terms


@dataclass
class _FakePasses:
    """What the fake network saw of x0 for the generator loss; None where no term reads it."""

    real_features: torch.Tensor | None = None  # MMD: features of the noised real latents (no graph)
    mmd_features: torch.Tensor | None = None  # MMD: features of x0 at the same σ and ε
    x_t: torch.Tensor | None = None  # DMD and GAN: x0 noised at σ in `dmd_range`
    sigma: torch.Tensor | None = None
    velocity: torch.Tensor | None = None  # DMD: the fake score at x_t
    features: torch.Tensor | None = None  # GAN: features of x_t


def _generator_fake_passes(nets: Networks, x0: torch.Tensor, z_real: torch.Tensor, text: TextEmbeddings,
                           settings: LossSettings, dmd_on: bool, rng: torch.Generator | None) -> _FakePasses:
    """The fake network's passes of `generator_loss`, as few as its terms allow. Noise is drawn
    MMD's first, then DMD's and GAN's (one x_t serves both): the order fixes a seed's numbers."""
    mmd_on, gan_on = settings.mmd_weight > 0, settings.gan_weight > 0
    out = _FakePasses()
    if mmd_on:
        sigma_mmd, eps = _noised_at(x0, settings.mmd_range, rng, settings.grid)
        x_mmd = add_noise(x0, eps, sigma_mmd)
        with torch.no_grad():
            _, out.real_features = nets.fake(add_noise(z_real.float(), eps, sigma_mmd), sigma_mmd, text,
                                             features_only=True)
    if dmd_on or gan_on:
        out.sigma, eps = _noised_at(x0, settings.dmd_range, rng, settings.grid)
        out.x_t = add_noise(x0, eps, out.sigma)
    if mmd_on and gan_on:  # both passes on x0 need gradients: one call
        out.velocity, out.features, out.mmd_features = _fake_pair(nets, (out.x_t, out.sigma), (x_mmd, sigma_mmd),
                                                                  text, velocity=dmd_on)
        return out
    if mmd_on:
        _, out.mmd_features = nets.fake(x_mmd, sigma_mmd, text, features_only=True)
    if dmd_on or gan_on:
        with nullcontext() if gan_on else torch.no_grad():  # DMD reads the velocity without its graph
            out.velocity, out.features = nets.fake(out.x_t, out.sigma, text, features_only=not dmd_on)
    return out


def fake_update_loss(nets: Networks, x0_sample: torch.Tensor, z_real: torch.Tensor, text: TextEmbeddings,
                     settings: LossSettings,
                     rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake-score network's loss on stop-grad student samples: x0-prediction MSE at a grid
    index uniform in `fake_range`, plus `discriminator_weight` × the GAN discriminator loss on
    real and generated latents noised with the same ε and σ.

    Args:
        nets (`Networks`): the fake network and GAN head train.
        x0_sample (`torch.Tensor`): student samples at s_i (detached here).
        z_real (`torch.Tensor`): real latents at s_i.
        text (`TextEmbeddings`): the batch's prompts.
        settings (`LossSettings`): `fake_range`, `gan_weight`, `discriminator_weight`.
        rng (`torch.Generator`, *optional*): the CPU generator σ and ε are drawn from.

    Returns:
        `tuple`: (the loss, its logged terms as detached 0-dim tensors).
    """
    x0_sample = x0_sample.detach().float()
    sigma, eps = _noised_at(x0_sample, settings.fake_range, rng, settings.grid)
    x_t = add_noise(x0_sample, eps, sigma)
    if settings.gan_weight > 0:
        v, feat_fake, feat_real = _fake_pair(nets, (x_t, sigma), (add_noise(z_real.float(), eps, sigma), sigma), text)
    else:
        v, _ = nets.fake(x_t, sigma, text)
    denoise = fake_score_loss(x0_from_velocity(x_t, v, sigma), x0_sample)
    total, terms = denoise, {"fake_denoise": denoise.detach()}
    if settings.gan_weight > 0:
        disc = gan_discriminator_loss(nets.head(feat_real), nets.head(feat_fake))
        total = total + settings.discriminator_weight * disc
        terms["gan_d"] = disc.detach()
    terms["fake"] = total.detach()
    return total, terms


def _fake_pair(nets: Networks, first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor],
               text: TextEmbeddings, velocity: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Two fake passes, (x, σ) each with the same text, as one call: half the kernel launches, and
    larger kernels at the small scales. Returns (velocity of the first or None, features of the
    first, features of the second); the second's rows stop at the tapped block."""
    n = len(first[0])
    v, feats = nets.fake(torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]),
                         TextEmbeddings.cat([text.expand(n), text.expand(len(second[0]))]),
                         features_only=not velocity, velocity_rows=n if velocity else None)
    return v, feats[:n], feats[n:]


def logged_floats(terms: dict) -> dict[str, float]:
    """Logged terms as floats, in order, with one device sync.

    Args:
        terms (`dict`): name -> 0-dim tensor, float or None (None: 0.0).

    Returns:
        `dict[str, float]`
    """
    tensors = [v.detach().float().reshape(()) for v in terms.values() if torch.is_tensor(v)]
    values = iter(torch.stack(tensors).tolist() if tensors else [])
    return {k: next(values) if torch.is_tensor(v) else float(v or 0.0) for k, v in terms.items()}
