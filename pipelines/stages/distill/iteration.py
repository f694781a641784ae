"""One training iteration of the distill stage (`train_iteration`), shared by the stage's workers
and the benchmarks."""

from __future__ import annotations

import torch


def train_iteration(nets, student_engine, fake_engine, next_batch, schedule, settings, uncond, step: int,
                    fake_updates: int, rng: torch.Generator) -> tuple[int, dict[str, float]]:
    """One SwD iteration at one scale, in the authors' order: `fake_updates` fake-score updates, then the
    generator update, so the critic that judges the student at s_i has just been fitted to its
    samples at s_i. Each update takes a fresh batch. `next_batch()` returns (text, {scale:
    latents}); engines are DeepSpeed engines (or anything with backward/step/get_global_grad_norm);
    `rng` draws all of the iteration's noise. Returns (scale index, logged terms)."""
    from torch.profiler import record_function

    from swd_core.scale_ops import x0_from_velocity
    from swd_core.training import (
        fake_update_loss,
        frozen,
        generator_loss,
        logged_floats,
        student_input,
        student_samples,
    )

    i = step % schedule.num_steps  # round-robin scale, shared by every batch of the iteration
    s_i = schedule.scales[i]
    terms: dict = {}

    # fake-score updates on stop-grad student samples at s_i; the student does not change
    # meanwhile, so one batched call samples for all of them
    batches = [next_batch() for _ in range(fake_updates)]
    with torch.no_grad(), record_function("student_samples"):  # names in a torch.profiler trace
        samples = student_samples(nets, batches, schedule, i, rng)
    for (text, latents), x0 in zip(batches, samples):
        with record_function("fake_update"):
            fake_loss, fake_terms = fake_update_loss(nets, x0, latents[s_i], text, settings, rng)
            fake_engine.backward(fake_loss)
            fake_engine.step()
        terms.update(fake_terms)
    if fake_updates:
        terms["grad_norm_f"] = fake_engine.get_global_grad_norm()

    # generator update on one more batch: gradients pass through the frozen fake network into
    # the student only
    text, latents = next_batch()
    x, sigma = student_input(latents, schedule, i, rng)
    with frozen(nets.fake_parameters()), record_function("generator_update"):
        x0 = x0_from_velocity(x, nets.student(x, sigma, text), sigma)
        loss, student_terms = generator_loss(nets, x0, latents[s_i], text, uncond, settings, rng)
        student_engine.backward(loss)
        student_engine.step()
    terms = {**student_terms, "grad_norm_g": student_engine.get_global_grad_norm(), **terms}
    return i, logged_floats(terms)  # the iteration's one wait for the GPU
