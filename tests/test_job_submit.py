"""The README's `ray job submit` path against a real local cluster on 127.0.0.1: a head and a
worker node started with `ray start`, as a user starts them."""

import json
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.ray_nodes import LocalCluster, node_env

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def job_cluster():
    """A cluster of its own, as a user starts one for `ray job submit`: a head (1 CPU, no GPU, the
    job drivers run there, with the dashboard's job API) and a worker node (2 CPUs), with Ray's
    token authentication on, as every rendered manifest turns it on: nodes, jobs and the CLI hold
    the token through RAY_AUTH_TOKEN."""
    # `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default):
    # time for the driver's graceful stop, which the test checks
    env = node_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_JOB_STOP_WAIT_TIME_S="60")
    cluster = LocalCluster.start(head_cpus=1, workers=[{"cpus": 2}], dashboard=True, env=env)
    try:
        deadline = time.time() + 120
        while True:  # the job API answers once the dashboard is up
            try:
                if requests.get(f"{cluster.dashboard}/api/version", timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the dashboard did not come up within 120 s"
            time.sleep(0.5)
        yield cluster.dashboard, env
    finally:
        cluster.stop()


def _submit(address: str, env: dict, args: list[str], submission_id: str | None = None) -> str:
    """`ray job submit` as the README writes it; the output (the job's log unless --no-wait)."""
    cmd = ["ray", "job", "submit", "--address", address, *(["--submission-id", submission_id, "--no-wait"]
                                                            if submission_id else []),
           "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "pipelines/distill.py",
           *args]
    deadline = time.time() + 60
    while True:  # the head's job agent may start a few seconds after its dashboard answers
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out or time.time() > deadline:
            break
    assert proc.returncode == 0, out[-3000:]
    return out


def _client(address: str, env: dict) -> JobSubmissionClient:
    """The SDK client with the cluster's token (this process's own Ray runs without auth)."""
    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


def test_the_job_api_answers_only_with_the_clusters_token(job_cluster):
    address, env = job_cluster
    assert requests.get(f"{address}/api/jobs/", timeout=30).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
    assert requests.get(f"{address}/api/jobs/", headers=wrong, timeout=30).status_code == 403
    assert isinstance(_client(address, env).list_jobs(), list)
    no_token = subprocess.run(["ray", "job", "list", "--address", address], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""})
    assert no_token.returncode != 0, no_token.stdout


def test_dry_run_submitted_as_a_ray_job(job_cluster):
    out = _submit(*job_cluster, ["--config", "pipelines/configs/sd35_medium_6step.yaml", "--dry-run"])
    assert "succeeded" in out
    assert "scales [32, 48, 64, 80, 96, 128]" in out
    assert "sigmas [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]" in out


def _wait(client: JobSubmissionClient, job: str, until, timeout: float, what: str, ended_ok: bool = False):
    deadline = time.time() + timeout
    while not until():
        status = client.get_job_status(job)
        assert ended_ok or status not in {JobStatus.FAILED, JobStatus.STOPPED}, \
            f"job {job} {status} while waiting for {what}:\n{client.get_job_logs(job)[-4000:]}"
        assert time.time() < deadline, \
            f"job {job}: no {what} within {timeout:.0f} s:\n{client.get_job_logs(job)[-4000:]}"
        time.sleep(1)


def test_the_whole_pipeline_as_a_ray_job_stopped_and_resubmitted(job_cluster, tmp_path):
    """precompute -> distill -> evaluate of the smoke definition as one job on the two-node
    cluster; stopped after its first checkpoint and submitted again, the job goes on from that
    checkpoint (and precompute keeps what it stored) to the exported student and the report."""
    address, env = job_cluster
    client = _client(address, env)
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
    # the stop is a SIGTERM mid-training (as Kubernetes stops a pod): one line, no stack dump from
    # Ray's C-level failure handler, and (below) the checkpoint intact for the next job
    stopped = client.get_job_logs("swd-e2e-first")
    assert stopped.count("[pipeline] SIGTERM received: stopping") == 1, stopped[-4000:]
    # the driver's own lines (Ray prefixes a worker's with "(name pid=N)"; Ray Train's internal
    # actors may print a traceback as the abort ends them)
    driver = [line for line in stopped.splitlines() if not line.startswith("(")]
    assert not [line for line in driver if "SIGTERM received at time" in line or "Traceback" in line], stopped[-4000:]
    assert not (run_dir / "eval" / "report.json").exists()
    from mlflow import MlflowClient

    tracked = json.loads((run_dir / "mlflow_run.json").read_text())  # the stop ended its MLflow run
    assert MlflowClient(tracking_uri=tracked["uri"]).get_run(tracked["run_id"]).info.status == "KILLED", \
        stopped[-4000:]

    _submit(address, env, args, submission_id="swd-e2e-again")
    _wait(client, "swd-e2e-again", lambda: client.get_job_status("swd-e2e-again") == JobStatus.SUCCEEDED, 900,
          "success")
    log = client.get_job_logs("swd-e2e-again")
    (tmp_path / "job.log").write_text(log)  # kept with pytest's temporary folders, for a look after a failure
    resumed = re.search(r"\[distill\] resumed from checkpoint at step (\d+)", log)
    assert resumed and int(resumed.group(1)) in (4, 8), log[-4000:]
    assert "done: ran precompute, distill, evaluate" in log
    steps = re.findall(r"\[distill\] step (\d+)/12 ", log)  # rank 0's lines, each once
    assert steps and len(steps) == len(set(steps)), sorted(steps, key=int)
    assert "16 input rows" in log and "0 to encode, 16 already in the store" in log  # precompute kept its rows
    assert (run_dir / "student" / "merged" / "model_index.json").exists()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert {m["name"] for m in report["models"]} >= {"swd_4", "teacher_4"}
    assert report["placement"]["device"] == "cpu"
    # a job log is read as a file: one line per event, no terminal escape codes
    assert "\x1b[" not in log, [line for line in log.splitlines() if "\x1b[" in line][:5]
    assert "Loading pipeline components" not in log and "Loading weights" not in log
