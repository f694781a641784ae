"""The README's `ray job submit` path against a real local head node on 127.0.0.1."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    gcs, dash = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}"  # short: Ray's socket paths have a length limit
    start = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_dry_run_submitted_as_a_ray_job(ray_head):
    address, env = ray_head
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env",
           "cluster/runtime_env.yaml", "--", "python", "pipelines/distill.py", "--config",
           "pipelines/configs/sd35_medium_6step.yaml", "--dry-run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert "scales [32, 48, 64, 80, 96, 128]" in out
    assert "sigmas [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]" in out
