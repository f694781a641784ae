"""bench/gpu_pipeline.py on CPU (`--device cpu --quick`): the script a GPU run uses, end to end
on the session's local Ray cluster (`--address`; a GPU run starts its own), every stage
reporting the device its model ran on."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_pipeline_bench_runs_every_stage_on_cpu(tmp_path, ray_cluster):
    out = tmp_path / "gpu_pipeline.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "bench/gpu_pipeline.py", "--device", "cpu", "--quick", "--requests", "3",
                           "--storage", str(tmp_path / "runs"), "--out", str(out), "--address", ray_cluster.address],
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
    assert len(deploy["latencies_s"]) == 3 and result["machine"]["cores"] == os.cpu_count()
    check_timings(result)
    assert (tmp_path / "runs" / "toy" / "student" / "merged" / "model_index.json").exists()


def check_timings(result: dict) -> None:
    """The bench's seconds are finite, positive and nest as measured: the stages within the total,
    the deploy stage's start-up and requests within the stage."""
    stages, deploy = result["stages"], result["stages"]["deploy"]
    seconds = [s["seconds"] for s in stages.values()] + [deploy["deploy_seconds"], result["total_seconds"]]
    assert all(math.isfinite(t) and t > 0 for t in seconds + deploy["latencies_s"]), (seconds, deploy["latencies_s"])
    assert deploy["median_latency_s"] == statistics.median(deploy["latencies_s"])
    assert deploy["deploy_seconds"] + sum(deploy["latencies_s"]) <= deploy["seconds"]
    assert sum(s["seconds"] for s in stages.values()) <= result["total_seconds"]
