"""The teacher-only gate metrics (swd_core.teacher_metrics) on small models: deterministic per
image, independent of the batch, and `teacher_alignment` tells real renders of their prompts from
the same renders under other prompts with the toy teacher."""

import pytest
import torch

from swd_core.teacher_metrics import teacher_alignment, teacher_cfg_denoise


def test_alignment_is_per_image_and_deterministic(tiny_adapter):
    torch.manual_seed(0)
    size = tiny_adapter.transformer.config.sample_size
    x = torch.randn(4, tiny_adapter.latent_channels, size, size)
    prompts, seeds = ["a red circle", "a blue square", "a red circle", "a green cross"], [0, 1, 2, 3]
    a = teacher_alignment(tiny_adapter, x, prompts, seeds, sigmas=(0.4, 0.7), batch_size=4)
    b = teacher_alignment(tiny_adapter, x, prompts, seeds, sigmas=(0.4, 0.7), batch_size=1)
    assert a.shape == (4,)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # the batch does not change an image's score
    same = teacher_alignment(tiny_adapter, x[[0, 0]], prompts[:1] * 2, [0, 0], sigmas=(0.4, 0.7))
    assert same[0] == same[1]  # identical samples, prompts and seeds score equal
    with pytest.raises(ValueError, match="sigmas must be in"):
        teacher_alignment(tiny_adapter, x, prompts, seeds, sigmas=(1.0,))
    with pytest.raises(ValueError, match="4 latents, 3 prompts"):
        teacher_alignment(tiny_adapter, x, prompts[:3], seeds)


def test_toy_teacher_finds_real_renders_aligned_with_their_own_prompts():
    from swd_core.adapters import load_adapter
    from swd_core.evaluate_model import render_real
    from swd_core.toy import shapes

    teacher = load_adapter("sd3", "builtin:toy-sd3", max_sequence_length=0)
    samples = shapes.held_out_prompts()[:16]
    prompts = [s.caption for s in samples]
    with torch.no_grad():
        latents = teacher.encode_images(render_real(samples))
    seeds = list(range(16))
    own = teacher_alignment(teacher, latents, prompts, seeds, batch_size=16)
    shuffled = teacher_alignment(teacher, latents, prompts[5:] + prompts[:5], seeds, batch_size=16)
    assert own.mean() > shuffled.mean() + 0.1  # measured: about 0.03 against -0.25
    assert (own > shuffled).float().mean() >= 0.8
    cfg_own = teacher_cfg_denoise(teacher, latents, prompts, seeds, batch_size=16)
    cfg_shuffled = teacher_cfg_denoise(teacher, latents, prompts[5:] + prompts[:5], seeds, batch_size=16)
    assert (cfg_own < cfg_shuffled).float().mean() >= 0.8  # guided to another prompt, the teacher moves it


def test_cfg_denoise_is_per_image_and_deterministic(tiny_adapter):
    torch.manual_seed(1)
    size = tiny_adapter.transformer.config.sample_size
    x = torch.randn(3, tiny_adapter.latent_channels, size, size)
    prompts, seeds = ["a red circle", "a blue square", "a red circle"], [5, 6, 5]
    a = teacher_cfg_denoise(tiny_adapter, x[[0, 1, 0]], prompts, seeds, batch_size=3)
    b = teacher_cfg_denoise(tiny_adapter, x[[0, 1, 0]], prompts, seeds, batch_size=1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert a[0] == a[2]  # identical samples, prompts and seeds score equal
