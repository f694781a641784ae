"""A distilled student exported as a LoRA and as a merged folder, used with stock diffusers."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

from swd_core.export import SCHEDULE_FILE, export_lora, export_merged_pipeline, read_schedule
from swd_core.generate import text_denoiser
from swd_core.lora import STUDENT, adapter_parameters, add_swd_adapters, use_role
from swd_core.samplers import sample_scalewise
from swd_core.tiny_models import resolve_pretrained
from tests.conftest import TINY


@pytest.fixture
def student(tiny_adapter):
    add_swd_adapters(tiny_adapter.transformer, rank=4)
    with torch.no_grad():
        for p in adapter_parameters(tiny_adapter.transformer, STUDENT):
            p.add_(0.05 * torch.randn_like(p))
    return tiny_adapter


def test_lora_export_loads_with_stock_load_lora_weights(student, tmp_path):
    export_lora(student, tmp_path / "lora")
    # The teacher folder as a user has it, plus the exported LoRA.
    pipe = StableDiffusion3Pipeline.from_pretrained(resolve_pretrained(TINY), text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    text = student.encode_prompts(["a red circle"])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        with use_role(student.transformer, STUDENT):
            ours = student.velocity(x, 0.6, text)[0]
        stock = pipe.transformer(hidden_states=x, timestep=torch.tensor([600.0]),
                                 encoder_hidden_states=text.prompt_embeds, pooled_projections=text.pooled,
                                 return_dict=False)[0]
    assert torch.allclose(ours, stock, atol=1e-5)


def test_merged_folder_samples_scalewise_with_stock_diffusers(student, tmp_path, toy_schedule):
    export_lora(student, tmp_path / "lora")
    out = export_merged_pipeline(TINY, tmp_path / "merged", toy_schedule, lora_dir=tmp_path / "lora",
                                 max_sequence_length=0)
    swd = read_schedule(out)
    assert swd["scales"] == [8, 10, 12, 16] and swd["height"] == 32 and swd["output_size"] == 64
    # The README snippet, verbatim in spirit: stock class, stock scheduler from the folder.
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchLCMScheduler) and pipe.scheduler.config.shift == 1.0
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(42)
    stock = pipe("a red circle", sigmas=swd["sigmas"], height=swd["height"], width=swd["width"], latents=noise,
                 guidance_scale=0.0, max_sequence_length=swd["max_sequence_length"], output_type="latent").images
    with use_role(student.transformer, STUDENT):
        ours = sample_scalewise(text_denoiser(student, student.encode_prompts(["a red circle"])), toy_schedule, noise,
                                torch.Generator().manual_seed(42))
    assert torch.allclose(ours, stock, atol=1e-4), (ours - stock).abs().max()
    # Full images come out at the final scale.
    torch.manual_seed(0)
    image = pipe("a red circle", sigmas=swd["sigmas"], height=swd["height"], width=swd["width"], guidance_scale=0.0,
                 max_sequence_length=0, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    # finite, mostly inside [0, 1] before clipping (about 1% clipped) and varying in every channel (std about
    # 0.15): a NaN, blank or saturated decode fails here
    assert np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    assert ((image == 0) | (image == 1)).mean() < 0.1 and (image.std(axis=(0, 1)) > 0.05).all()


def test_full_finetune_export(tiny_adapter, tmp_path, toy_schedule):
    with torch.no_grad():
        tiny_adapter.transformer.proj_out.bias.add_(0.1)
    out = export_merged_pipeline(TINY, tmp_path / "full", toy_schedule, transformer=tiny_adapter.transformer,
                                 max_sequence_length=0)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert torch.allclose(pipe.transformer.proj_out.bias, tiny_adapter.transformer.proj_out.bias)
    with pytest.raises(ValueError, match="exactly one of"):
        export_merged_pipeline(TINY, tmp_path / "x", toy_schedule)


def test_read_schedule_refuses_a_plain_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=SCHEDULE_FILE):
        read_schedule(tmp_path)
