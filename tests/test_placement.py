"""Every stage runs its model on the device its Ray resources give it, and a stage that reserved
GPUs where torch sees no CUDA device stops at once with the setting's name (pipelines/placement.py).
The Ray tests use the session cluster's worker node, which declares a GPU this machine lacks."""

import os

import pytest
import torch

from pipelines.placement import PlacementError, stage_device
from pipelines.schema import parse_pipeline_config
from tests.conftest import TINY


def test_a_stage_that_reserves_no_gpu_runs_on_cpu():
    assert stage_device("evaluate", "evaluate.gpus", 0) == "cpu"


def test_reserved_gpus_put_the_model_on_cuda_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stage_device("precompute", "precompute.gpus_per_actor", 0.5) == "cuda"


def test_reserved_but_invisible_gpus_fail_with_the_setting_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a node without CUDA, on any machine
    with pytest.raises(PlacementError, match=r"^deploy: `serve.gpus_per_replica: 1` reserves GPUs.*sees no CUDA "
                                             r"device.*set `serve.gpus_per_replica: 0` to run this stage on CPU"):
        stage_device("deploy", "serve.gpus_per_replica", 1)


def test_training_workers_load_no_text_encoders_without_validation():
    from pipelines.stages.distill.engines import build_networks

    data = {"name": "t", "teacher": {"path": TINY, "max_sequence_length": 0},
            "distill": {"schedule": {"preset": "toy_4step"}, "losses": {"feature_block": 1},
                        "validation": {"num_prompts": 0}}}
    adapter, _ = build_networks(parse_pipeline_config(data), torch.device("cpu"))
    assert adapter.pipe.text_encoder is None and adapter.pipe.text_encoder_2 is None
    assert adapter.transformer is not None and adapter.vae is not None


def _cfg(tmp_path, **over):
    data = {"name": "place", "teacher": {"path": TINY, "max_sequence_length": 0},
            "data": {"sources": [{"path": "builtin:shapes", "format": "shapes", "limit": 4}]},
            "distill": {"schedule": {"preset": "toy_4step"}, "losses": {"feature_block": 1}},
            "evaluate": {"num_prompts": 2, "teacher_steps": 2, "domain": "shapes"},
            "resources": {"storage": str(tmp_path)}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return parse_pipeline_config(data)


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA: its premise is a GPU Ray "
                                                     "declares that torch cannot see")
def test_stages_holding_gpus_without_cuda_stop_with_the_setting_named(ray_cluster, tmp_path):
    from pipelines.stages import evaluate, precompute, preview

    # Ray gives the task the (declared) GPU, then the stage finds no CUDA: no silent CPU run.
    with pytest.raises(PlacementError, match=r"evaluate: `evaluate.gpus: 0.5`.*GPU id\(s\) \[0\]"):
        evaluate.run(_cfg(tmp_path, evaluate={"gpus": 0.5}))
    with pytest.raises(PlacementError, match=r"preview: `evaluate.gpus: 1`"):
        preview.run(_cfg(tmp_path, evaluate={"gpus": 1}))
    with pytest.raises(PlacementError, match=r"precompute: `precompute.gpus_per_actor: 0.5`"):
        precompute.run(_cfg(tmp_path, precompute={"gpus_per_actor": 0.5, "actors": 1}))
    assert not (tmp_path / "place" / "eval").exists()


@pytest.mark.ray
def test_a_stage_task_logs_at_the_drivers_level(ray_cluster, monkeypatch):
    """--quiet / --verbose reach a stage's Ray task even where the driver's ray.init gave the
    workers no level (as inside `ray job submit`, and as this test process's)."""
    import logging

    from pipelines.logs import LEVEL_ENV, logger
    from pipelines.placement import run_as_task

    def level_in_task():
        return os.environ.get(LEVEL_ENV), logger("pipelines.stages.evaluate").getEffectiveLevel()

    monkeypatch.setenv(LEVEL_ENV, "WARNING")
    assert run_as_task("evaluate", level_in_task, cpus=0.1, gpus=0) == ("WARNING", logging.WARNING)
