"""LoRA roles on one shared base: storage sharing and where gradients may flow."""

import pytest
import torch

from swd_core.gan_head import GANHead
from swd_core.lora import FAKE, STUDENT, adapter_parameters, add_swd_adapters, base_parameters, set_trainable, use_role
from swd_core.losses import dmd_loss, gan_generator_loss, mmd_linear
from swd_core.scale_ops import add_noise, x0_from_velocity


@pytest.fixture
def lora_adapter(tiny_adapter):
    base_numel = sum(p.numel() for p in tiny_adapter.transformer.parameters())
    add_swd_adapters(tiny_adapter.transformer, rank=4)
    # Give the student a non-zero B so student != teacher, as after some training.
    with torch.no_grad():
        for p in adapter_parameters(tiny_adapter.transformer, STUDENT):
            p.add_(0.05 * torch.randn_like(p))
    tiny_adapter.base_numel = base_numel
    return tiny_adapter


def _unique_numel(params):
    seen, total = set(), 0
    for p in params:
        key = p.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.untyped_storage().nbytes() // p.element_size()
    return total


def test_roles_share_one_base_copy(lora_adapter):
    tr = lora_adapter.transformer
    student, fake = adapter_parameters(tr, STUDENT), adapter_parameters(tr, FAKE)
    assert student and fake and len(student) == len(fake)
    lora_numel = sum(p.numel() for p in student + fake)
    # Memory held by all parameters = one base copy + two adapters (not two bases).
    assert _unique_numel(tr.parameters()) == lora_adapter.base_numel + lora_numel
    assert lora_numel < 0.5 * lora_adapter.base_numel
    # A change to a base weight shows up in the teacher, the student and the fake network.
    text = lora_adapter.encode_prompts(["a red circle"])
    x = torch.randn(1, 4, 8, 8)

    def outputs():
        with torch.no_grad():
            res = {}
            for role in ("teacher", "student", "fake"):
                with use_role(tr, role):
                    res[role] = lora_adapter.velocity(x, 0.5, text)[0]
            return res

    before = outputs()
    assert not torch.allclose(before["student"], before["teacher"])
    assert torch.equal(before["fake"], before["teacher"])  # fresh fake adapter: B = 0
    with torch.no_grad():
        base_parameters(tr)[5].add_(1.0)
    after = outputs()
    assert all(not torch.allclose(before[r], after[r]) for r in before)


def test_role_switch_keeps_trainable_flags(lora_adapter):
    tr = lora_adapter.transformer
    set_trainable(tr, FAKE, False)
    for role in ("teacher", "fake", "student"):
        with use_role(tr, role):
            assert all(p.requires_grad for p in adapter_parameters(tr, STUDENT))
            assert not any(p.requires_grad for p in adapter_parameters(tr, FAKE))
            assert not any(p.requires_grad for p in base_parameters(tr))


def test_generator_step_gradients_reach_only_the_student(lora_adapter):
    """MMD, GAN and DMD generator losses: the student gets gradients through the frozen fake
    network and head; the fake adapter, the head and the shared base (= the teacher) get none."""
    a, tr = lora_adapter, lora_adapter.transformer
    head = GANHead(tr.config.num_attention_heads * tr.config.attention_head_dim)
    with torch.no_grad():  # a fake network that differs from the teacher, so DMD has a signal
        for p in adapter_parameters(tr, FAKE):
            p.add_(0.05 * torch.randn_like(p))
    set_trainable(tr, FAKE, False)
    head.requires_grad_(False)
    text = a.encode_prompts(["a red circle", "a blue star"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with use_role(tr, STUDENT):
        x0 = x0_from_velocity(x, a.velocity(x, 1.0, text)[0], 1.0)
    real = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.5, 0.4])
    with use_role(tr, FAKE):
        with torch.no_grad():
            f_real = a.velocity(add_noise(real, eps, sigma), sigma, text, [1], features_only=True)[1][1]
        f_fake = a.velocity(add_noise(x0, eps, sigma), sigma, text, [1], features_only=True)[1][1]
        v_fake, feats = a.velocity(add_noise(x0, eps, sigma), sigma, text, [1])
    with use_role(tr, "teacher"), torch.no_grad():
        v_teacher = a.velocity(add_noise(x0, eps, sigma), sigma, text)[0]
    xt = add_noise(x0, eps, sigma)
    student = adapter_parameters(tr, STUDENT)
    terms = {"mmd": mmd_linear(f_real, f_fake), "gan": gan_generator_loss(head(feats[1])),
             "dmd": dmd_loss(x0, x0_from_velocity(xt, v_teacher, sigma), x0_from_velocity(xt, v_fake, sigma))}
    for name, term in terms.items():
        # Each term on its own reaches the student: MMD and GAN only through the frozen fake network.
        grads = torch.autograd.grad(term, student, retain_graph=True, allow_unused=True)
        # every student adapter, finite and not all zero (not just their sum)
        assert all(gr is not None and torch.isfinite(gr).all() and gr.any() for gr in grads), name
    sum(terms.values()).backward()
    assert all(p.grad is None for p in adapter_parameters(tr, FAKE))
    assert all(p.grad is None for p in base_parameters(tr))  # the teacher never gets gradients
    assert all(p.grad is None for p in head.parameters())


def test_fake_update_gradients_reach_only_the_fake(lora_adapter):
    a, tr = lora_adapter, lora_adapter.transformer
    set_trainable(tr, STUDENT, False)
    text = a.encode_prompts(["a red circle"])
    with torch.no_grad(), use_role(tr, STUDENT):
        x = torch.randn(1, 4, 8, 8)
        x0 = x0_from_velocity(x, a.velocity(x, 1.0, text)[0], 1.0)
    eps, sigma = torch.randn_like(x0), torch.tensor([0.7])
    xt = add_noise(x0, eps, sigma)
    with use_role(tr, FAKE):
        pred = x0_from_velocity(xt, a.velocity(xt, sigma, text)[0], sigma)
    torch.nn.functional.mse_loss(pred, x0).backward()
    assert all(p.grad is not None for p in adapter_parameters(tr, FAKE))
    assert all(p.grad is None for p in adapter_parameters(tr, STUDENT))
    assert all(p.grad is None for p in base_parameters(tr))


def test_unknown_role_is_refused(lora_adapter):
    with pytest.raises(ValueError, match="allowed"):
        with use_role(lora_adapter.transformer, "critic"):
            pass


def test_default_targets_adapt_attention_and_both_mlps_of_every_block(tiny_adapter):
    """Both MLPs of a joint block, the image stream's `ff` and the text stream's `ff_context`
    (the last block has no `ff_context`), for the student and the fake score."""
    tr = tiny_adapter.transformer
    add_swd_adapters(tr, rank=4)
    adapted = {name for name, m in tr.named_modules() if hasattr(m, "lora_A")}
    for b, block in enumerate(tr.transformer_blocks):
        want = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"}
        if block.ff_context is not None:
            want |= {"ff_context.net.0.proj", "ff_context.net.2"}
        assert {f"transformer_blocks.{b}.{w}" for w in want} <= adapted, b
    assert any(".ff_context." in n for n in adapted)
    for layer in (tr.transformer_blocks[0].ff_context.net[2], tr.transformer_blocks[0].ff.net[2]):
        assert set(layer.lora_A) == {STUDENT, FAKE}
    # still one base and two adapters' worth of parameters
    student, fake = adapter_parameters(tr, STUDENT), adapter_parameters(tr, FAKE)
    base = base_parameters(tr)
    assert _unique_numel(tr.parameters()) == sum(p.numel() for p in base + student + fake)
    assert sum(p.numel() for p in student) == sum(p.numel() for p in fake)
