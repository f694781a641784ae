"""`distill.grad_clip` reaches DeepSpeed: in the config the distill engines are built with, and in
the gradient a real DeepSpeed step (CPU, a one-process world) hands its optimizer."""

from types import SimpleNamespace

import pytest
import torch

from pipelines.stages.distill.engines import build_engines, deepspeed_config
from tests.deepspeed_world import config, tiny_nets


def test_the_deepspeed_config_carries_the_definitions_grad_clip(tmp_path):
    assert deepspeed_config(config(tmp_path), 1e-4, 2, 2, False)["gradient_clipping"] == 10.0  # the documented default
    cfg = config(tmp_path, grad_clip=0.25)
    for stage in (0, 2, 3):
        built = deepspeed_config(cfg, 1e-4, stage, 2, bf16=True)
        assert built["gradient_clipping"] == 0.25 and built["zero_optimization"] == {"stage": stage}


def test_both_distill_engines_are_initialised_with_the_definitions_grad_clip(tmp_path, monkeypatch):
    """The student's and the fake score's engines: each goes through `deepspeed.initialize`."""
    import deepspeed

    seen = []
    monkeypatch.setattr(deepspeed, "initialize",
                        lambda **kw: (seen.append(kw["config"]) or SimpleNamespace(), None, None, None))
    build_engines(config(tmp_path, grad_clip=0.5, lr=1e-4, fake_lr=3e-4, zero_stage=3), tiny_nets(), 2, bf16=False)
    assert [c["gradient_clipping"] for c in seen] == [0.5, 0.5]
    assert [c["zero_optimization"]["stage"] for c in seen] == [3, 2]  # the fake engine stays at ZeRO <= 2
    assert [c["optimizer"]["params"]["lr"] for c in seen] == [1e-4, 3e-4]


def loss_of(student, fake, head, x):
    """Large losses: their gradient norms are far above the small clip."""
    return (student(x) * 10).pow(2).mean(), (head(fake(x)) * 10).pow(2).mean()


def raw_gradient_norms(x) -> tuple[float, float]:
    nets = tiny_nets()
    losses = loss_of(nets.student_transformer, nets.fake_base, nets.head, x)
    norms = []
    for loss, params in zip(losses, (nets.student_parameters(), nets.fake_parameters())):
        grads = torch.autograd.grad(loss, params)
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item())
    return tuple(norms)


def step_and_record(engine, loss) -> float:
    """One engine step; the norm of the gradient its torch optimizer steps with."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's AdamW
    seen = []
    step = inner.step

    def recording(*args, **kwargs):
        grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item())
        return step(*args, **kwargs)

    inner.step = recording
    engine.backward(loss)
    engine.step()
    assert len(seen) == 1, "the engine did not step its optimizer"
    return seen[0]


@pytest.mark.training
@pytest.mark.parametrize("zero_stage", [2, 0])
def test_a_deepspeed_step_hands_its_optimizer_the_gradient_clipped_to_grad_clip(tmp_path, deepspeed_world, zero_stage):
    """AdamW's update hardly depends on the gradient's scale, so the weights cannot show the
    clipping; the gradient it receives can: norm grad_clip when clipped, the raw norm otherwise."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    raw = raw_gradient_norms(x)
    assert 10 < min(raw) and max(raw) < 1e3
    for clip, expected in ((1e-3, (1e-3, 1e-3)), (1e3, raw)):
        nets = tiny_nets()
        before = [p.detach().clone() for p in nets.student_parameters()]
        student_engine, fake_engine = build_engines(config(tmp_path, grad_clip=clip, zero_stage=zero_stage), nets, 4,
                                                    bf16=False)
        loss_g, _ = loss_of(student_engine.module, nets.fake_base, nets.head, x)
        got_g = step_and_record(student_engine, loss_g)
        _, loss_f = loss_of(nets.student_transformer, fake_engine.module["base"], fake_engine.module["head"], x)
        got_f = step_and_record(fake_engine, loss_f)
        assert got_g == pytest.approx(expected[0], rel=1e-3), (clip, got_g)
        assert got_f == pytest.approx(expected[1], rel=1e-3), (clip, got_f)
        after = list(student_engine.module.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
