"""The README's `ray job submit` path against a real local head node on 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group: stopping it stops only this head
    (`ray stop` would also take down any other local cluster, e.g. the session fixture's)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the conftest's loopback-only switch; a `ray start` head does without
    # Head and client agree on no token auth (a token file left in ~/.ray by another local cluster
    # would otherwise switch the head to token auth while the CLI sends none).
    env["RAY_AUTH_MODE"] = "disabled"
    gcs, dash = _free_port(), _free_port()
    # Every agent port free-picked too: the session's cluster (conftest) already holds the
    # defaults (dashboard agent 52365, ...), and a head whose agent cannot bind answers every
    # submission with "No available agent to submit job".
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}"  # short: Ray's socket paths have a length limit
    start = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=1", f"--temp-dir={temp_dir}",
             "--disable-usage-stats", *agent_ports]
    proc = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the dashboard answers (401 without a token: local clusters use token auth) once up
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, "ray start --head exited early"
            assert time.time() < deadline, "ray head did not come up within 120 s"
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_dry_run_submitted_as_a_ray_job(ray_head):
    address, env = ray_head
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env",
           "cluster/runtime_env.yaml", "--", "python", "pipelines/distill.py", "--config",
           "pipelines/configs/sd35_medium_6step.yaml", "--dry-run"]
    for _ in range(12):  # the head's job agent may start a few seconds after its dashboard answers
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert "scales [32, 48, 64, 80, 96, 128]" in out
    assert "sigmas [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]" in out
