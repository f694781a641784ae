"""What importing the algorithm costs: every Ray worker, task and test process imports it, and
most never load a teacher pipeline (data checks, drivers, the CLI's plan)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["swd_core.training", "swd_core.adapters", "pipelines.stages.precompute.checks"])
def test_importing_loads_no_diffusers_pipeline_or_transformers_model(module):
    code = (f"import sys, {module}; "
            "print('\\n'.join(m for m in sys.modules if m.startswith(('diffusers.pipelines', 'transformers.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"importing {module} loaded {out[:10]}"


def test_an_adapter_still_finds_its_pipeline_when_it_loads_a_teacher(tiny_adapter):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(tiny_adapter.pipe, StableDiffusion3Pipeline)
