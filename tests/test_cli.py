"""The `swd` console entry point and `--set` overrides."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main

ROOT = Path(__file__).parents[1]
SWD = Path(sys.executable).parent / "swd"  # installed by `make install` (pyproject's [project.scripts])


@pytest.mark.parametrize("command", [[], ["run"], ["plan"], ["serve"], ["retrain"], ["render"], ["schema"]])
def test_swd_and_every_subcommand_have_help(command):
    r = subprocess.run([str(SWD), *command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:")


def test_set_overrides_reach_the_plan(capsys):
    assert main(["plan", "--set", "distill.steps=600", "--set", "resources.num_workers=1",
                 "--set", "distill.lora.targets=[to_q, to_k]"]) == 0
    out = capsys.readouterr().out
    assert "overrides (--set): distill.steps=600, resources.num_workers=1" in out
    assert "600 generator steps" in out and "1 worker(s)" in out and "to_q, to_k" in out


@pytest.mark.parametrize("override,words", [
    ("distill.stepz=3", "unknown field 'distill.stepz' (did you mean 'distill.steps'?)"),
    ("distil.steps=3", "unknown field 'distil' (did you mean 'distill'?)"),
    ("distill.steps=many", "distill.steps: got 'many': Input should be a valid integer"),
    ("distill.steps=301", "steps 301 is not a multiple of the schedule's 4 steps"),
    ("distill.steps", "expected key.path=value"),
])
def test_bad_overrides_fail_with_what_is_wrong(override, words, capsys):
    assert main(["plan", "--set", override]) == 2
    assert words in capsys.readouterr().err


def test_schema_is_the_definitions_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"teacher", "distill", "retrain"} <= set(schema["properties"])
    assert schema["required"] == ["name", "teacher", "distill"]


def test_a_flux_plan_prints_no_library_fallback_warnings():
    """The FLUX definition's sigma grid imports diffusers' FLUX pipeline module, which asks
    transformers for image processors that need torchvision: the plan holds only the plan."""
    r = subprocess.run([str(SWD), "plan", "--config", "pipelines/configs/flux1_dev_4step.yaml"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "family flux" in r.stdout
    assert "[transformers]" not in r.stdout + r.stderr and "torchvision" not in r.stdout + r.stderr, r.stderr
