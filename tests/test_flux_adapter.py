"""The FLUX.1 adapter on a tiny FLUX built from a config: it gives the stock pipeline's velocities
and samples, on unpacked latents at every scale, with the taps the losses read."""

import pytest
import torch

from swd_core.adapters import TextEmbeddings, load_adapter
from swd_core.adapters.flux import FluxAdapter, pack, unpack
from swd_core.generate import text_denoiser
from swd_core.samplers import sample_scalewise
from swd_core.schedules import preset
from swd_core.tiny_models import TinyFluxConfig, build_tiny_flux, parse_builtin


@pytest.fixture(scope="module")
def flux():
    pipe = build_tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    return FluxAdapter(pipe, max_sequence_length=16, guidance_scale=3.5)


def test_builtin_tiny_flux_loads_through_from_pretrained():
    assert parse_builtin("builtin:tiny-flux?layers=1&rope_axes=8,12,12") == TinyFluxConfig(layers=1)
    a = load_adapter("flux", "builtin:tiny-flux?layers=1", max_sequence_length=16)
    assert isinstance(a, FluxAdapter) and a.num_blocks == 1 and a.latent_channels == 16 and a.patch_size == 2
    assert a.guidance_embeds and a.shift_factor == pytest.approx(0.1) and a.scaling_factor == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rope_axes"):
        build_tiny_flux(TinyFluxConfig(rope_axes=(8, 8, 8)))


def test_packing_is_the_pipelines_and_inverts():
    z = torch.randn(2, 16, 6, 6)
    tokens = pack(z)
    assert tokens.shape == (2, 9, 64)
    assert torch.equal(tokens[0, 0], z[0, :, :2, :2].reshape(16, 4).reshape(-1))  # one 2x2 patch, channel-first
    assert torch.equal(unpack(tokens, 6), z)


def test_euler_on_the_adapter_is_the_stock_flux_pipeline(flux):
    """Same noise, same sigmas (the pipeline's own, shifted by the image's token count), same
    embedded guidance: the adapter's velocities give the stock pipeline's latents exactly."""
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    stock = flux.pipe("a red circle", latents=pack(noise), height=64, width=64, num_inference_steps=4,
                      guidance_scale=3.5, max_sequence_length=16, output_type="latent").images
    sigmas = flux.pipe.scheduler.sigmas.clone()
    text = flux.encode_prompts(["a red circle"])
    x = noise.clone()
    for i in range(4):
        x = x + (sigmas[i + 1] - sigmas[i]) * flux.velocity(x, sigmas[i], text)[0]
    assert torch.allclose(unpack(stock, 16), x, atol=1e-5)
    flux.guidance_scale = 1.0  # the embedding is used: another guidance, another velocity
    try:
        assert not torch.allclose(flux.velocity(noise, sigmas[0], text)[0], x)
    finally:
        flux.guidance_scale = 3.5


def test_scalewise_sampling_runs_at_every_scale_and_taps_image_tokens(flux):
    schedule = preset("toy_4step", patch_size=flux.patch_size)
    text = flux.encode_prompts(["a red circle", "a blue star"])
    noise = torch.randn(2, 16, schedule.scales[0], schedule.scales[0], generator=torch.Generator().manual_seed(1))
    out = sample_scalewise(text_denoiser(flux, text), schedule, noise, torch.Generator().manual_seed(2))
    assert out.shape == (2, 16, 16, 16) and torch.isfinite(out).all()
    x = torch.randn(2, 16, 10, 10)
    v, feats = flux.velocity(x, torch.tensor([0.9, 0.5]), text, feature_blocks=[0, 1])
    assert v.shape == x.shape and feats[0].shape == feats[1].shape == (2, 25, 64)  # (B, tokens, width)
    none, early = flux.velocity(x, 0.5, text, feature_blocks=[0], features_only=True)
    assert none is None and early[0].shape == (2, 25, 64)
    # the velocity of only the first row, with every row's features, is that row's own call
    v1, feats1 = flux.velocity(x, 0.5, text, feature_blocks=[0], velocity_rows=1)
    alone, _ = flux.velocity(x[:1], 0.5, TextEmbeddings(text.prompt_embeds[:1], text.pooled[:1]))
    assert v1.shape == (1, 16, 10, 10) and torch.allclose(v1, alone, atol=1e-5) and feats1[0].shape[0] == 2


def test_vae_round_trip_applies_shift_and_scale(flux):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = flux.encode_images(images)
    raw = flux.vae.encode(images).latent_dist.mode()
    assert z.shape == (2, 16, 8, 8) and torch.allclose(z, (raw - 0.1) * 0.5)
    assert torch.allclose(flux.decode_latents(z), flux.vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)


def test_the_guided_teacher_is_one_pass_with_the_embedding_or_cfg_without_one(flux):
    text, empty = flux.encode_prompts(["a red circle"]), flux.empty_prompt()
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    batches = []
    hook = flux.transformer.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape[0]),
                                                      with_kwargs=True)
    try:
        guided = flux.guided_velocity(x, torch.tensor(0.7), text, empty, 4.0)
    finally:
        hook.remove()
    assert batches == [1]  # one pass, no unconditional half
    assert torch.equal(guided, flux.velocity(x, torch.tensor(0.7), text, guidance=4.0)[0].float())
    assert not torch.allclose(guided, flux.velocity(x, torch.tensor(0.7), text)[0])  # 4.0 is not the default 3.5
    schnell = FluxAdapter(build_tiny_flux(TinyFluxConfig(guidance_embeds=False)), max_sequence_length=16)
    text, empty = schnell.encode_prompts(["a red circle"]), schnell.empty_prompt()
    v_c, v_u = schnell.velocity(x, 0.7, text)[0], schnell.velocity(x, 0.7, empty)[0]
    assert torch.allclose(schnell.guided_velocity(x, torch.tensor(0.7), text, empty, 4.0), v_u + 4.0 * (v_c - v_u),
                          atol=1e-5)


def test_the_teacher_sampler_is_stock_flux_at_every_size(flux):
    """`generate_latents` samples a FLUX teacher as `FluxPipeline` does: its sigmas shifted by the
    token count of the size sampled, its guidance as the embedding."""
    from swd_core.generate import generate_latents
    from swd_core.samplers import initial_noise

    for side in (16, 8):
        ours = generate_latents(flux, ["a red circle"], [5], teacher_steps=4, guidance=3.5, size=side)
        noise = initial_noise(1, 16, side, [torch.Generator().manual_seed(5)])
        stock = flux.pipe("a red circle", latents=pack(noise), height=side * 4, width=side * 4, num_inference_steps=4,
                          guidance_scale=3.5, max_sequence_length=16, output_type="latent").images
        assert torch.allclose(ours, unpack(stock, side), atol=1e-5), side


def test_one_sigma_grid_per_run_is_stock_flux_at_the_final_scale():
    """The rule: a FLUX run's grid (schedule boundaries, DMD / MMD / fake-score noise) is the
    28-step grid stock FLUX.1 samples the final size with, at every scale. At 1024 px (128² latent,
    4096 tokens) its shift is e^1.15 ≈ 3.16, not SD3's 3, and the base grid is FLUX's linspace(1, 1/28)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from swd_core.schedules import family_sigma_grid, sigma_grid

    grid = family_sigma_grid("flux", 128)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=1.15)  # mu at 4096 tokens
    assert torch.equal(grid, scheduler.sigmas[:-1].float()) and len(grid) == 28
    assert (grid - sigma_grid()).abs().max() > 0.05  # not the SD3 grid
    assert torch.equal(family_sigma_grid("sd3", 128), sigma_grid())
    assert not torch.equal(family_sigma_grid("flux", 64), grid)  # the final size sets it
    with pytest.raises(ValueError, match="allowed"):
        family_sigma_grid("sdxl", 128)


def test_an_exported_flux_student_samples_scalewise_through_diffusers_alone(tmp_path):
    """The merged folder ships its scale-wise pipeline: loaded with `custom_pipeline`, it gives the
    project's scale-wise sampler's latents for the same noise, and images at the final size."""
    import json

    from diffusers import DiffusionPipeline

    from swd_core.export import export_merged_pipeline

    spec = "builtin:tiny-flux?layers=1"
    student = load_adapter("flux", spec, max_sequence_length=16)
    with torch.no_grad():
        student.transformer.proj_out.bias.add_(0.1)  # a "trained" student, unlike the teacher
    schedule = preset("toy_4step", patch_size=2)
    out = export_merged_pipeline(spec, tmp_path / "merged", schedule, transformer=student.transformer,
                                 max_sequence_length=16, family="flux", guidance_scale=3.5)
    swd = json.loads((out / "swd_schedule.json").read_text())
    assert swd["family"] == "flux" and swd["guidance_scale"] == 3.5 and (out / "pipeline.py").exists()
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True)
    assert type(pipe).__name__ == "SwDFluxScalewisePipeline"
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue star"]
    stock = pipe(prompts, scales=swd["scales"], sigmas=swd["sigmas"], guidance_scale=swd["guidance_scale"],
                 latents=noise, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                 max_sequence_length=swd["max_sequence_length"], output_type="latent").images
    ours = sample_scalewise(text_denoiser(student, student.encode_prompts(prompts)), schedule, noise,
                            [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.allclose(ours, stock, atol=1e-4), (ours - stock).abs().max()
    image = pipe("a red circle", scales=swd["scales"], sigmas=swd["sigmas"], max_sequence_length=16).images[0]
    assert image.size == (64, 64)


def test_an_exported_student_loads_with_its_folders_family_and_guidance(tmp_path):
    """Evaluate, the export's sample grid and serving load a student through `load_exported_student`:
    the family and the embedded guidance are the folder's (swd_schedule.json), and a definition of
    the other family is refused."""
    from swd_core.evaluate_model import load_exported_student
    from swd_core.export import export_merged_pipeline

    spec = "builtin:tiny-flux?layers=1"
    teacher = load_adapter("flux", spec, max_sequence_length=16)
    schedule = preset("toy_4step", patch_size=2)
    out = export_merged_pipeline(spec, tmp_path / "merged", schedule, transformer=teacher.transformer,
                                 max_sequence_length=16, family="flux", guidance_scale=2.0)
    student, loaded, record = load_exported_student(str(out))
    assert isinstance(student, FluxAdapter) and student.guidance_scale == 2.0 and loaded == schedule
    assert load_exported_student(str(out), "flux")[0].guidance_scale == 2.0
    with pytest.raises(ValueError, match="exported 'flux' student.*family 'sd3'"):
        load_exported_student(str(out), "sd3")


def test_the_flux_docs_load_the_export_and_the_lora_with_diffusers_alone(tmp_path):
    """docs/flux.md's two snippets, run as written on a tiny FLUX run folder (only the paths
    swapped): the merged folder as a custom pipeline, and the LoRA on the stock teacher with the
    folder's pipeline.py. Both give the same image for the same noise, and it is not the teacher's."""
    import re
    from pathlib import Path

    import numpy as np

    from swd_core.export import export_lora, export_merged_pipeline
    from swd_core.lora import STUDENT, adapter_parameters, add_swd_adapters
    from swd_core.tiny_models import resolve_pretrained

    spec = "builtin:tiny-flux?layers=1"
    student = load_adapter("flux", spec, max_sequence_length=16)
    add_swd_adapters(student.transformer, rank=4, names=(STUDENT,))
    torch.manual_seed(0)
    for p in adapter_parameters(student.transformer, STUDENT):  # B = 0 at init: a "trained" adapter
        torch.nn.init.normal_(p, std=0.05)
    run = tmp_path / "run"
    export_lora(student, run / "student" / "lora")
    export_merged_pipeline(spec, run / "student" / "merged", preset("toy_4step", patch_size=2),
                           lora_dir=run / "student" / "lora", max_sequence_length=16, family="flux",
                           guidance_scale=3.5)
    docs = (Path(__file__).parents[1] / "docs" / "flux.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    assert len(snippets) == 2
    swaps = {'"runs/flux1-dev-swd-4step/student/merged"': repr(str(run / "student" / "merged")),
             '"runs/flux1-dev-swd-4step"': repr(str(run)),
             '"black-forest-labs/FLUX.1-dev"': repr(resolve_pretrained(spec))}
    images = []
    for code in snippets:
        for k, v in swaps.items():
            code = code.replace(k, v)
        ns = {}
        torch.manual_seed(7)  # the snippets draw their noise from torch's global generator
        exec(code, ns)
        assert ns["image"].size == (ns["swd"]["output_size"],) * 2
        images.append(np.asarray(ns["image"], dtype=int))
    assert np.abs(images[0] - images[1]).max() <= 2  # merged == stock teacher + fused LoRA
    teacher = load_adapter("flux", spec, max_sequence_length=16).transformer
    to_q = ns["pipe"].transformer.transformer_blocks[0].attn.to_q
    to_q = getattr(to_q, "base_layer", to_q)  # fused into the base weight of a peft layer
    assert not torch.allclose(to_q.weight, teacher.transformer_blocks[0].attn.to_q.weight)
