"""The project's samplers against stock diffusers on the same model and noise."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

from swd_core.generate import cfg_denoiser, generate_latents, text_denoiser
from swd_core.samplers import sample_euler, sample_full_resolution, sample_scalewise
from swd_core.schedules import ScaleSchedule


def _stock_scalewise(pipe, prompt, schedule, noise, seed):
    pipe.scheduler = FlowMatchLCMScheduler(shift=1.0, scale_factors=schedule.scale_factors(), upscale_mode="bicubic")
    torch.manual_seed(seed)  # the stock pipeline draws re-noising from the global generator
    return pipe(prompt, sigmas=list(schedule.sigmas), latents=noise, height=noise.shape[-1] * pipe.vae_scale_factor,
                width=noise.shape[-1] * pipe.vae_scale_factor, guidance_scale=0.0, max_sequence_length=0,
                output_type="latent").images


def test_scalewise_sampler_agrees_with_stock_flow_match_lcm(tiny_adapter, toy_schedule):
    a = tiny_adapter
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    stock = _stock_scalewise(a.pipe, "a red circle", toy_schedule, noise, seed=7)
    ours = sample_scalewise(text_denoiser(a, a.encode_prompts(["a red circle"])), toy_schedule, noise,
                            torch.Generator().manual_seed(7))
    assert ours.shape == stock.shape == (1, 4, 16, 16)
    assert torch.allclose(ours, stock, atol=1e-5), (ours - stock).abs().max()
    # and it is not trivially equal: other re-noising gives a different sample
    other = sample_scalewise(text_denoiser(a, a.encode_prompts(["a red circle"])), toy_schedule, noise,
                             torch.Generator().manual_seed(8))
    assert not torch.allclose(other, stock, atol=1e-3)


def test_six_step_schedule_agrees_too(tiny_adapter):
    from swd_core.schedules import preset

    schedule = preset("toy_6step", patch_size=2)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    stock = _stock_scalewise(tiny_adapter.pipe, ["a star", "a blue square"], schedule, noise, seed=3)
    ours = sample_scalewise(text_denoiser(tiny_adapter, tiny_adapter.encode_prompts(["a star", "a blue square"])),
                            schedule, noise, torch.Generator().manual_seed(3))
    assert torch.allclose(ours, stock, atol=1e-5)


def test_full_resolution_sampler_is_the_same_sigmas_at_the_final_scale(tiny_adapter, toy_schedule):
    a = tiny_adapter
    text = a.encode_prompts(["a red circle"])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    full = sample_full_resolution(text_denoiser(a, text), toy_schedule, noise, torch.Generator().manual_seed(4))
    explicit = ScaleSchedule((16,) * 4, toy_schedule.sigmas)
    again = sample_scalewise(text_denoiser(a, text), explicit, noise, torch.Generator().manual_seed(4))
    assert torch.equal(full, again) and full.shape == (1, 4, 16, 16)
    stock = _stock_scalewise(a.pipe, "a red circle", explicit, noise, seed=4)  # scale factors all 1
    assert torch.allclose(full, stock, atol=1e-5)


def test_sampler_upscales_x0_not_the_noisy_latent(toy_schedule):
    """A denoiser whose x̂0 is a known tensor T_s at each scale: every next input must be
    (1 − σ') · bicubic(T_s) + σ' · ε with fresh ε, not an upscaled noisy latent."""
    import torch.nn.functional as F

    targets = {s: torch.randn(1, 1, s, s, generator=torch.Generator().manual_seed(s)) for s in toy_schedule.scales}
    seen = []

    def denoiser(x, sigma):
        seen.append((x.clone(), float(sigma)))
        return (x - targets[x.shape[-1]]) / sigma  # so x̂0 = x − σ v = T_s

    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    out = sample_scalewise(denoiser, toy_schedule, noise, torch.Generator().manual_seed(0))
    assert [x.shape[-1] for x, _ in seen] == [8, 10, 12, 16]
    assert [round(s, 4) for _, s in seen] == [1.0, 0.8959, 0.7371, 0.6022]
    assert torch.allclose(out, targets[16], atol=1e-6)
    replay = torch.Generator().manual_seed(0)
    for i in range(1, 4):
        prev, size, sigma = toy_schedule.scales[i - 1], toy_schedule.scales[i], toy_schedule.sigmas[i]
        eps = torch.randn(1, 1, size, size, generator=replay)
        expected = (1 - sigma) * F.interpolate(targets[prev], size=(size, size), mode="bicubic") + sigma * eps
        assert torch.allclose(seen[i][0], expected, atol=1e-5)
        noisy_upscaled = F.interpolate(seen[i - 1][0], size=(size, size), mode="bicubic")
        assert not torch.allclose(seen[i][0], noisy_upscaled, atol=1e-2)


def test_teacher_cfg_sampler_agrees_with_stock_sd3_pipeline(tiny_adapter):
    a = tiny_adapter
    a.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    prompts = ["a red circle", "a green star"]
    stock = a.pipe(prompts, latents=noise, height=64, width=64, num_inference_steps=28, guidance_scale=4.5,
                   max_sequence_length=0, output_type="latent").images
    text = a.encode_prompts(prompts)
    ours = sample_euler(cfg_denoiser(a, text, a.empty_prompt(), 4.5), noise, 28)
    assert torch.allclose(ours, stock, atol=1e-4), (ours - stock).abs().max()


def test_an_image_depends_only_on_its_seed(tiny_adapter, toy_schedule):
    alone = generate_latents(tiny_adapter, ["a blue star"], [11], schedule=toy_schedule)
    batched = generate_latents(tiny_adapter, ["a red circle", "a blue star", "a cross"], [3, 11, 5],
                               schedule=toy_schedule)
    assert torch.allclose(alone[0], batched[1], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_the_teacher_samples_at_a_smaller_size_as_stock_sd3_does(tiny_adapter):
    """`size` picks the latent side of the teacher's Euler sampler (teacher quality per resolution):
    the same latents as the stock pipeline asked for 32 px images."""
    a = tiny_adapter
    a.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = generate_latents(a, ["a red circle"], [5], teacher_steps=6, guidance=4.5, size=8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    stock = a.pipe(["a red circle"], latents=noise, height=32, width=32, num_inference_steps=6, guidance_scale=4.5,
                   max_sequence_length=0, output_type="latent").images
    assert ours.shape == (1, 4, 8, 8) and torch.allclose(ours, stock, atol=1e-4)
    with pytest.raises(ValueError, match="a schedule fixes its own sizes"):
        from swd_core.schedules import preset

        generate_latents(a, ["a red circle"], [5], schedule=preset("toy_4step", patch_size=2), size=8)
