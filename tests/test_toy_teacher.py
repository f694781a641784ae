"""The committed toy teacher loads as SD3.5 would: through diffusers and through the adapter."""

import json

import numpy as np
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

from swd_core.adapters import load_adapter
from swd_core.tiny_models import TOY_TEACHER
from swd_core.toy import shapes


def test_folder_is_small_and_records_how_it_was_made():
    size = sum(p.stat().st_size for p in TOY_TEACHER.rglob("*") if p.is_file())
    assert size < 40 * 2**20
    record = json.loads((TOY_TEACHER.parent / "training_record.json").read_text())
    for phase in ("classifier", "vae", "transformer"):
        assert "command" in record[phase] and "seed" in record[phase]
    assert record["transformer"]["architecture"]["layers"] >= 4


def test_loads_with_stock_diffusers():
    # fp16 on disk (size); load as float32 on CPU, as SD3.5 users pass a dtype too
    pipe = StableDiffusion3Pipeline.from_pretrained(TOY_TEACHER, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert pipe.transformer.config.patch_size == 2 and pipe.vae_scale_factor == 4
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels
    assert pipe.transformer.config.sample_size == 16
    ids = pipe.tokenizer("a red circle").input_ids
    vocab = pipe.tokenizer.get_vocab()
    assert ids[1:4] == [vocab["a"], vocab["red"], vocab["circle"]]  # real word ids, not all end-of-text
    torch.manual_seed(0)
    image = pipe("a large red circle in the center", num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
                 max_sequence_length=0, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    assert ((image == 0) | (image == 1)).mean() < 0.1 and (image.std(axis=(0, 1)) > 0.05).all()  # not blank or clipped
    # it draws the prompt: the centre is red (measured R 0.71, G 0.20, B 0.20)
    r, g, b = image[24:40, 24:40].mean(axis=(0, 1))
    assert r > g + 0.3 and r > b + 0.3


def test_loads_through_the_adapter_and_reconstructs_shapes():
    adapter = load_adapter("sd3", "builtin:toy-sd3", max_sequence_length=0)
    channels = AutoencoderKL.load_config(TOY_TEACHER / "vae")["latent_channels"]
    assert adapter.latent_channels == channels and adapter.num_blocks >= 4
    rng = np.random.default_rng(0)
    real = shapes.to_tensor([shapes.render(s, rng) for s in shapes.held_out_prompts()[:16]])
    with torch.no_grad():
        z = adapter.encode_images(real)
        recon = adapter.decode_latents(z)
    assert z.shape == (16, channels, 16, 16)
    assert 0.5 < z.std() < 2.0  # scaling_factor normalises the latents
    from swd_core.evaluation import psnr

    assert psnr(real, recon) > 26


def _positions(transformer, side: int) -> torch.Tensor:
    """The position embedding a latent of `side`×`side` gets: PatchEmbed(0) minus the conv bias."""
    pe = transformer.pos_embed
    out = pe(torch.zeros(1, transformer.config.in_channels, side, side))
    return (out - pe.proj.bias)[0].reshape(side // 2, side // 2, -1)


def test_small_scales_keep_their_corners_on_the_corner_positions():
    """The toy teacher interpolates its position grid, so a 32 px image's corners sit
    where the 64 px corners do; SD3.5's cropping would put them on the centre positions."""
    from swd_core.tiny_models import TinySD3Config, build_tiny_sd3

    assert SD3Transformer2DModel.load_config(TOY_TEACHER / "transformer")["pos_embed_max_size"] is None
    with torch.no_grad():
        interp = build_tiny_sd3(TinySD3Config(interpolate_pos_embed=True)).transformer
        full, small = _positions(interp, 16), _positions(interp, 8)
        assert torch.allclose(small[0, 0], full[0, 0]) and torch.allclose(small[3, 3], full[6, 6], atol=1e-6)
        crop = build_tiny_sd3(TinySD3Config()).transformer
        full, small = _positions(crop, 16), _positions(crop, 8)
        assert torch.allclose(small[0, 0], full[2, 2]) and torch.allclose(small[3, 3], full[5, 5])
        assert torch.allclose(_positions(crop, 16), _positions(interp, 16))  # the same grid at the native size


def test_trained_at_every_scale_the_toy_schedules_ask_about():
    """SwD queries the teacher at the student's scale: the committed teacher was trained at every
    latent side of the toy 4- and 6-step schedules, and the record says from what."""
    from swd_core.schedules import preset
    from swd_core.toy import RECORD
    from swd_core.toy.train import TOY_SIDES, downscale, trained_sides

    needed = set(preset("toy_4step", patch_size=2).scales) | set(preset("toy_6step", patch_size=2).scales)
    assert needed <= set(TOY_SIDES) <= set(trained_sides())
    record = json.loads(RECORD.read_text())["transformer"]
    assert record["init"] in ("teacher", "scratch") and record["steps"] > 0
    if record["init"] == "teacher":
        assert record["started_from"]["steps"] > 0 and "sides" not in record["started_from"]
    # training images of a side are the 64 px renders area-downscaled in pixel space
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(downscale(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
