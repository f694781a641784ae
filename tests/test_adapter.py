import torch

from swd_core.adapters import load_adapter
from swd_core.adapters.base import TextEmbeddings
from swd_core.adapters.sd3 import SD3Adapter


def test_tokenizer_ids_are_real_words(tiny_adapter):
    ids = tiny_adapter.pipe.tokenizer(["a red circle"], padding="max_length", max_length=16).input_ids[0]
    vocab = tiny_adapter.pipe.tokenizer.get_vocab()
    assert ids[:5] == [vocab["<bos>"], vocab["a"], vocab["red"], vocab["circle"], vocab["<eos>"]]
    assert len(set(ids[1:4])) == 3  # not all end-of-text / unknown


def test_encode_prompts_matches_pipeline_and_empty_prompt(tiny_adapter):
    text = tiny_adapter.encode_prompts(["a red circle", "a blue star"])
    ref, _, pooled, _ = tiny_adapter.pipe.encode_prompt("a blue star", None, None, do_classifier_free_guidance=False,
                                                        max_sequence_length=0)
    assert torch.allclose(text.prompt_embeds[1:], ref, atol=1e-5)
    assert torch.allclose(text.pooled[1:], pooled, atol=1e-5)
    empty = tiny_adapter.empty_prompt()
    assert len(empty) == 1 and not torch.equal(empty.pooled, text.pooled[:1])


def test_vae_roundtrip_applies_shift_and_scaling(tiny_adapter):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a = tiny_adapter
    a.scaling_factor, a.shift_factor = 1.5, 0.25
    z = a.encode_images(images)
    raw = a.vae.encode(images).latent_dist.mode()
    assert z.shape == (2, 4, 8, 8)
    assert torch.allclose(z, (raw - 0.25) * 1.5)
    assert torch.allclose(a.decode_latents(z), a.vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)


def test_velocity_features_and_early_stop(tiny_adapter):
    a = tiny_adapter
    text = a.encode_prompts(["a red circle"])
    x = torch.randn(2, 4, 10, 10)
    v, feats = a.velocity(x, torch.tensor([0.9, 0.5]), text, feature_blocks=[0, 1])
    direct = a.transformer(hidden_states=x, timestep=torch.tensor([900.0, 500.0]),
                           encoder_hidden_states=text.prompt_embeds.expand(2, -1, -1),
                           pooled_projections=text.pooled.expand(2, -1), return_dict=False)[0]
    assert torch.allclose(v, direct)
    inner = a.transformer.config.num_attention_heads * a.transformer.config.attention_head_dim
    assert feats[0].shape == feats[1].shape == (2, 25, inner)  # 10x10 latent, patch 2 -> 25 image tokens
    calls = []
    hook = a.transformer.transformer_blocks[2].register_forward_hook(lambda *args: calls.append(1))
    v2, feats2 = a.velocity(x, torch.tensor([0.9, 0.5]), text, feature_blocks=[1], features_only=True)
    hook.remove()
    assert v2 is None and not calls  # block 2 never ran
    assert torch.equal(feats2[1], feats[1])
    assert not a.transformer.transformer_blocks[1]._forward_hooks  # hooks removed


def test_velocity_rows_give_all_features_and_the_first_rows_velocity(tiny_adapter):
    """One call over [a; b] with velocity_rows = len(a) equals a full call on a and a
    features-only call on b: the cut batch reaches the later blocks and the output layers."""
    a = tiny_adapter
    text = a.encode_prompts(["a red circle", "a blue star", "a green square"])
    x, sigma = torch.randn(3, 4, 10, 10), torch.tensor([0.9, 0.5, 0.2])
    for block in (0, 2):  # a middle block, and the last one (only the output layers follow)
        seen = []
        hook = a.transformer.transformer_blocks[-1].register_forward_pre_hook(
            lambda _m, _args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
        v, feats = a.velocity(x, sigma, text, feature_blocks=[block], velocity_rows=2)
        hook.remove()
        v_a, feats_a = a.velocity(x[:2], sigma[:2], TextEmbeddings(text.prompt_embeds[:2], text.pooled[:2]),
                                  feature_blocks=[block])
        _, feats_b = a.velocity(x[2:], sigma[2:], TextEmbeddings(text.prompt_embeds[2:], text.pooled[2:]),
                                feature_blocks=[block], features_only=True)
        assert v.shape == (2, 4, 10, 10) and torch.allclose(v, v_a, atol=1e-5)
        assert torch.allclose(feats[block], torch.cat([feats_a[block], feats_b[block]]), atol=1e-5)
        assert seen == [2 if block < 2 else 3]  # the last block ran on the cut batch only when after the tap
    assert not any(m._forward_pre_hooks for m in [*a.transformer.transformer_blocks, a.transformer.norm_out])
    try:
        a.velocity(x, sigma, text, velocity_rows=2)
    except ValueError as err:
        assert "needs a feature block" in str(err)
    else:
        raise AssertionError("velocity_rows without a feature block accepted")


def test_same_loading_path_for_folders(tmp_path, tiny_adapter):
    tiny_adapter.pipe.save_pretrained(tmp_path / "m")
    again = SD3Adapter.from_pretrained(str(tmp_path / "m"), max_sequence_length=0)
    sd1, sd2 = tiny_adapter.transformer.state_dict(), again.transformer.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    try:
        load_adapter("sdxl", str(tmp_path / "m"))
    except ValueError as err:
        assert "allowed: ['flux', 'sd3']" in str(err)
    else:
        raise AssertionError("unknown family accepted")
