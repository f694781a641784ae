"""Each loss against a value computed by hand on small tensors, and where its gradient goes."""

import math

import torch

from swd_core.gan_head import GANHead
from swd_core.losses import dmd_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss, mmd_linear, mmd_rbf


def test_mmd_linear_pseudo_huber_by_hand():
    real = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # token mean (2, 3)
    fake = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # token mean (1, 1)
    c = 1e-3
    expected = ((math.sqrt(1 + c * c) - c) + (math.sqrt(4 + c * c) - c)) / 2
    assert math.isclose(mmd_linear(real, fake, c).item(), expected, rel_tol=1e-6)
    assert mmd_linear(real, real, c).item() == 0.0


def test_mmd_rbf_unbiased_by_hand():
    x = torch.tensor([[[0.0], [1.0]]])
    y = torch.tensor([[[0.0], [2.0]]])
    e = math.exp
    xx = e(-0.5)  # the one off-diagonal pair, both orders, over n(n-1) = 2
    yy = e(-2.0)
    xy = (1 + e(-2.0) + 2 * e(-0.5)) / 4
    assert math.isclose(mmd_rbf(x, y, bandwidth=1.0).item(), xx + yy - 2 * xy, rel_tol=1e-6)


def test_dmd_loss_value_and_gradient_by_hand():
    x = torch.tensor([[[[1.0, 3.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[0.0, 1.0]]]], requires_grad=True)
    fake = torch.tensor([[[[2.0, 2.0]]]], requires_grad=True)
    # p_real = (1, 2), p_fake = (-1, 1), mean|p_real| = 1.5, grad = (2, 1) / 1.5
    loss = dmd_loss(x, teacher, fake)
    assert math.isclose(loss.item(), 0.5 * ((4 / 3) ** 2 + (2 / 3) ** 2) / 2, rel_tol=1e-6)
    loss.backward()
    # d/dx 0.5·mean((x − stopgrad(x − g))²) = g / numel: the target is stop-grad
    assert torch.allclose(x.grad, torch.tensor([[[[4 / 3, 2 / 3]]]]) / 2)
    assert teacher.grad is None and fake.grad is None


def test_dmd_normaliser_is_per_sample():
    x = torch.zeros(2, 1, 1, 2)
    teacher = torch.tensor([[[[-1.0, -1.0]]], [[[-10.0, -10.0]]]])
    fake = torch.zeros(2, 1, 1, 2)
    # p_real = 1 and 10 per sample; after normalisation both samples' grads equal 1
    loss = dmd_loss(x, teacher, fake)
    assert math.isclose(loss.item(), 0.5, rel_tol=1e-6)


def test_gan_losses_by_hand():
    fake_logits = torch.tensor([0.0, 1.0])
    by_hand = (math.log(2) + math.log(1 + math.exp(-1))) / 2
    assert math.isclose(gan_generator_loss(fake_logits).item(), by_hand, rel_tol=1e-6)
    d = gan_discriminator_loss(torch.tensor([2.0]), torch.tensor([-1.0]))
    assert math.isclose(d.item(), math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)), rel_tol=1e-6)


def test_fake_score_loss_is_mse_with_stopgrad_target():
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    target = torch.tensor([0.0, 0.0], requires_grad=True)
    loss = fake_score_loss(pred, target)
    assert math.isclose(loss.item(), 2.5)
    loss.backward()
    assert target.grad is None and torch.allclose(pred.grad, torch.tensor([1.0, 2.0]))


def test_gan_head_architecture():
    head = GANHead(64)
    assert head.widths == [64, 48, 32, 17, 1]
    kinds = [type(m) for m in head.net]
    assert kinds == [torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Linear] * 4
    feats = torch.randn(3, 10, 64)
    out = head(feats)
    assert out.shape == (3,)
    # token-mean pooled: permuting tokens does not change the logit
    assert torch.allclose(out, head(feats[:, torch.randperm(10)]), atol=1e-6)
    assert torch.allclose(out, head(feats.mean(dim=1, keepdim=True)), atol=1e-6)


def test_gan_head_in_bf16_reads_float32_features():
    # DeepSpeed's bf16 mode casts the head to bfloat16 while the tapped features arrive in float32
    # (found on an H200 run of bench/distill.py): the head must still run and return float32 logits.
    torch.manual_seed(1)
    head = GANHead(64)
    feats = torch.randn(3, 10, 64)
    expected = head(feats)
    head = head.to(torch.bfloat16)
    out = head(feats)
    assert out.dtype == torch.float32 and out.shape == (3,)
    # Logits here 0.12, 0.60, -0.06; bf16 is off fp32 by <= 0.005 (<= 0.013 over 200 seeds), while a
    # missing last bias moves them by 0.14 and a last weight 10% off by 0.07: 0.02 tells rounding from a bug.
    assert torch.allclose(out, expected, rtol=0, atol=0.02)
    assert torch.allclose(head(feats.to(torch.bfloat16)), out, rtol=0, atol=0.02)  # bf16 features: rounding only
