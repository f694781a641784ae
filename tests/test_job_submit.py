"""The README's `ray job submit` path against a real local cluster on 127.0.0.1: a head and a
worker node started with `ray start`, as a user starts them."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from ray.job_submission import JobStatus, JobSubmissionClient

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict) -> subprocess.Popen:
    """`ray start ... --block` in its own process group: stopping it stops only this node (`ray
    stop` would also take down any other local cluster, e.g. the session fixture's). Every agent
    port is free-picked: the session's cluster (conftest) already holds the defaults, and a node
    whose agent cannot bind answers every submission with "No available agent to submit job"."""
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    return subprocess.Popen(["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             *agent_ports, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (1 CPU, no GPU, the job drivers run there) and a worker node (2 CPUs)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the conftest's loopback-only switch; a `ray start` head does without
    env.pop("RAY_ADDRESS", None)
    # Head and client agree on no token auth (a token file left in ~/.ray by another local cluster
    # would otherwise switch the head to token auth while the CLI sends none).
    env["RAY_AUTH_MODE"] = "disabled"
    gcs, dash = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"ray-test-{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = _ray_start(["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                       "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}"], env)
    worker = None
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the dashboard answers once up
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                pass
            assert head.poll() is None, "ray start --head exited early"
            assert time.time() < deadline, "ray head did not come up within 120 s"
            time.sleep(1)
        worker = _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--num-gpus=0"], env)
        deadline = time.time() + 120
        while len([n for n in requests.get(f"{address}/nodes?view=summary", timeout=5).json()["data"]["summary"]
                   if n["raylet"]["state"] == "ALIVE"]) < 2:
            assert worker.poll() is None, "ray start (worker node) exited early"
            assert time.time() < deadline, "the worker node did not join within 120 s"
            time.sleep(1)
        yield address, env
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)


def _submit(address: str, env: dict, args: list[str], submission_id: str | None = None) -> str:
    """`ray job submit` as the README writes it; the output (the job's log unless --no-wait)."""
    cmd = ["ray", "job", "submit", "--address", address, *(["--submission-id", submission_id, "--no-wait"]
                                                            if submission_id else []),
           "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "pipelines/distill.py",
           *args]
    for _ in range(12):  # the head's job agent may start a few seconds after its dashboard answers
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(5)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_dry_run_submitted_as_a_ray_job(ray_cluster):
    out = _submit(*ray_cluster, ["--config", "pipelines/configs/sd35_medium_6step.yaml", "--dry-run"])
    assert "succeeded" in out
    assert "scales [32, 48, 64, 80, 96, 128]" in out
    assert "sigmas [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]" in out


def _wait(client: JobSubmissionClient, job: str, until, timeout: float, what: str, ended_ok: bool = False):
    deadline = time.time() + timeout
    while not until():
        status = client.get_job_status(job)
        assert ended_ok or status not in {JobStatus.FAILED, JobStatus.STOPPED}, \
            f"job {job} {status} while waiting for {what}:\n{client.get_job_logs(job)[-4000:]}"
        assert time.time() < deadline, f"job {job}: no {what} within {timeout:.0f} s:\n{client.get_job_logs(job)[-4000:]}"
        time.sleep(1)


def test_the_whole_pipeline_as_a_ray_job_stopped_and_resubmitted(ray_cluster, tmp_path):
    """precompute -> distill -> evaluate of the smoke definition as one job on the two-node
    cluster; stopped after its first checkpoint and submitted again, the job goes on from that
    checkpoint (and precompute keeps what it stored) to the exported student and the report."""
    address, env = ray_cluster
    client = JobSubmissionClient(address)
    storage = tmp_path / "runs"
    args = ["--config", "pipelines/configs/toy_smoke.yaml", "--set", f"resources.storage={storage}"]
    run_dir = storage / "toy-smoke"

    _submit(address, env, args, submission_id="swd-e2e-first")
    # past the first checkpoint (step 4) by two steps: Ray Train has registered it by then (a
    # checkpoint folder that is written but not yet registered is not resumed from)
    _wait(client, "swd-e2e-first", lambda: "[distill] step 6/12" in client.get_job_logs("swd-e2e-first"), 600,
          "step 6")
    client.stop_job("swd-e2e-first")
    _wait(client, "swd-e2e-first", lambda: client.get_job_status("swd-e2e-first").is_terminal(), 120, "stopped",
          ended_ok=True)
    assert client.get_job_status("swd-e2e-first") == JobStatus.STOPPED
    assert not (run_dir / "eval" / "report.json").exists()

    _submit(address, env, args, submission_id="swd-e2e-again")
    _wait(client, "swd-e2e-again", lambda: client.get_job_status("swd-e2e-again") == JobStatus.SUCCEEDED, 900,
          "success")
    log = client.get_job_logs("swd-e2e-again")
    (tmp_path / "job.log").write_text(log)  # kept with pytest's temporary folders, for a look after a failure
    resumed = re.search(r"\[distill\] resumed from checkpoint at step (\d+)", log)
    assert resumed and int(resumed.group(1)) in (4, 8), log[-4000:]
    assert "done: ran precompute, distill, evaluate" in log
    assert "16 input rows" in log and "0 to encode, 16 already in the store" in log  # precompute kept its rows
    assert (run_dir / "student" / "merged" / "model_index.json").exists()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert {m["name"] for m in report["models"]} >= {"swd_4", "teacher_4"}
    assert report["placement"]["device"] == "cpu"
    # a job log is read as a file: one line per event, no terminal escape codes
    assert "\x1b[" not in log, [line for line in log.splitlines() if "\x1b[" in line][:5]
    assert "Loading pipeline components" not in log and "Loading weights" not in log
