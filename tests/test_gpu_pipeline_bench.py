"""bench/gpu_pipeline.py on CPU (`--device cpu --quick`): the script a GPU run uses, end to end
through its own local Ray, every stage reporting the device its model ran on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.ray
def test_the_gpu_pipeline_bench_runs_every_stage_on_cpu(tmp_path):
    out = tmp_path / "gpu_pipeline.json"
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "bench/gpu_pipeline.py", "--device", "cpu", "--quick", "--requests", "3",
                           "--storage", str(tmp_path / "runs"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert list(stages) == ["precompute", "distill", "evaluate", "deploy"]
    assert stages["precompute"]["device"] == "cpu" and stages["precompute"]["rows"] == 16
    assert stages["distill"]["devices"] == ["cpu"] and len(stages["distill"]["workers"]) == 2
    assert stages["evaluate"]["device"] == "cpu" and "swd_4" in stages["evaluate"]["models"]
    deploy = stages["deploy"]
    assert deploy["device"] == "cpu" and deploy["requests"] == 3 and deploy["errors"] == []
    assert len(deploy["latencies_s"]) == 3 and all(s > 0 for s in deploy["latencies_s"])
    assert all(stages[s]["seconds"] > 0 for s in stages) and result["machine"]["cores"] == os.cpu_count()
    assert (tmp_path / "runs" / "toy" / "student" / "merged" / "model_index.json").exists()
