"""What importing the algorithm costs: every Ray worker, task and test process imports it, and
most never load a teacher pipeline (data checks, drivers, the CLI's plan)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["swd_core.training", "swd_core.adapters", "pipelines.stages.precompute.checks"])
def test_importing_loads_no_diffusers_pipeline_or_transformers_model(module):
    code = (f"import sys, {module}; "
            "print('\\n'.join(m for m in sys.modules "
            "if m.startswith(('diffusers.pipelines', 'transformers.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"importing {module} loaded {out[:10]}"


def test_an_adapter_still_finds_its_pipeline_when_it_loads_a_teacher(tiny_adapter):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(tiny_adapter.pipe, StableDiffusion3Pipeline)


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """Every training process imports DeepSpeed, whose autotuner imports mlflow when installed."""
    code = ("import sys; from pipelines.stages.distill.engines import import_deepspeed; ds = import_deepspeed(); "
            "loaded = 'mlflow' in sys.modules; import mlflow; from deepspeed.autotuning import autotuner; "
            "print(loaded, autotuner.has_mlflow, hasattr(mlflow, 'MlflowClient'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}).stdout.split()
    assert out == ["False", "False", "True"], out


@pytest.mark.parametrize("module", ["pipelines.schema", "pipelines.retraining.lease", "pipelines.store"])
def test_reading_a_definition_loads_no_torch(module):
    """Lease holders, command-line tools and Ray Train's controller read definitions and stores;
    torch (2 s per process here) loads when a schedule's sigmas are computed."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"]
