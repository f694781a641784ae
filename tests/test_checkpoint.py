"""The distill stage's checkpoints refuse to resume a run whose trained parameters changed."""

import json

import pytest
import ray.train
import torch

from pipelines.schema import load_pipeline_config
from pipelines.stages.distill.checkpoint import restore_checkpoint, trained_parameters

TOY = "pipelines/configs/toy.yaml"


def _resume_from(tmp_path, monkeypatch, state: dict):
    (tmp_path / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(tmp_path)))


def test_a_checkpoint_with_other_lora_targets_is_refused(tmp_path, monkeypatch):
    cfg = load_pipeline_config(TOY)
    saved = {**trained_parameters(cfg),
             "lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]}
    _resume_from(tmp_path, monkeypatch, {"step": 24, "trained_parameters": saved})
    with pytest.raises(ValueError, match=r"trained other parameters than the definition asks for \(lora_targets "):
        restore_checkpoint(cfg, 0, None, None, None, "cpu", "digest")  # refused before any engine is touched


def test_no_checkpoint_starts_fresh(monkeypatch):
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert restore_checkpoint(load_pipeline_config(TOY), 0, None, None, None, "cpu", "d") == (0, 0, 0, None)


def _full(engine) -> list:
    """The engine's module weights, whole (ZeRO-3 holds a shard of each)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


@pytest.mark.training
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_resume_goes_on_exactly_as_the_uninterrupted_engines(tmp_path, monkeypatch, deepspeed_world, zero_stage):
    """Real DeepSpeed engines (one process, CPU) train 2 steps and checkpoint as the stage does;
    engines built from other weights restore it through the weights-only reads, and a third step
    of both gives the same weights, learning rate and (ZeRO-2) EMA to the bit: the optimizer's
    moments, the schedule's position and the step count came back whole."""
    from pipelines.stages.distill.engines import build_engines, student_ema
    from tests.deepspeed_world import config, tiny_nets, train_steps, trained_checkpoint

    cfg = config(tmp_path, zero_stage=zero_stage, mode="full", steps=8, lr=1e-2, lr_decay_fraction=0.5,
                 ema_decay=0.9 if zero_stage < 3 else 0.0)
    nets, student_engine, fake_engine, ema, x = trained_checkpoint(cfg, tmp_path / "ckpt")
    fresh = tiny_nets(seed=1)
    g2, f2 = build_engines(cfg, fresh, 4, bf16=False)
    ema2 = student_ema(cfg, fresh)
    assert not all(torch.equal(a, b) for a, b in zip(_full(student_engine), _full(g2)))
    ckpt_dir = str(tmp_path / "ckpt")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(ckpt_dir))
    assert restore_checkpoint(cfg, 0, g2, f2, ema2, "cpu", "plan") == (2, 0, 8, None)
    assert g2.global_steps == student_engine.global_steps == 2
    train_steps(student_engine, fake_engine, x, 1, ema, nets.student_parameters())
    train_steps(g2, f2, x, 1, ema2, fresh.student_parameters())
    for a, b in ((student_engine, g2), (fake_engine, f2)):
        assert a.get_lr() == b.get_lr()
        for p, q in zip(_full(a), _full(b)):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    if ema is not None:
        for p, q in zip(ema.shadow_params, ema2.shadow_params):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
