"""The distill stage's checkpoints refuse to resume a run whose trained parameters changed."""

import json

import pytest
import ray.train

from pipelines.schema import load_pipeline_config
from pipelines.stages.distill.checkpoint import restore_checkpoint, trained_parameters

TOY = "pipelines/configs/toy.yaml"


def _resume_from(tmp_path, monkeypatch, state: dict):
    (tmp_path / "state.json").write_text(json.dumps(state))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(tmp_path)))


def test_a_checkpoint_with_other_lora_targets_is_refused(tmp_path, monkeypatch):
    cfg = load_pipeline_config(TOY)
    saved = {**trained_parameters(cfg), "lora_targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]}
    _resume_from(tmp_path, monkeypatch, {"step": 24, "trained_parameters": saved})
    with pytest.raises(ValueError, match=r"trained other parameters than the definition asks for \(lora_targets "):
        restore_checkpoint(cfg, 0, None, None, None, "cpu", "digest")  # refused before any engine is touched


def test_no_checkpoint_starts_fresh(monkeypatch):
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert restore_checkpoint(load_pipeline_config(TOY), 0, None, None, None, "cpu", "d") == (0, 0, 0, None)
