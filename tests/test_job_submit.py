"""The README's `ray job submit` path against a real local 2-node cluster on 127.0.0.1, started
with the `ray start` CLI as a user would: the dry run, the whole toy pipeline (precompute ->
distill -> evaluate) as one job, and a stopped job that resumes from its checkpoint when it is
submitted again."""

import json
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

TOY = "pipelines/configs/toy.yaml"


def short_toy(storage: Path, name: str, steps: int = 8) -> list[str]:
    """`--set` overrides that shrink the toy definition to a few minutes' worth on 2 cores: 48
    shapes rows, 2 rows per worker and step, one fake update, checkpoints every round of the 4
    scales, no validation, a few evaluation prompts. Everything else is the toy's own."""
    sets = [
        f"name={name}",
        # absolute: the job runs in a copy of the working dir, and the test reads the outputs here
        f"resources.storage={storage}",
        # one worker per node: the run really spans both nodes
        "resources.placement_strategy=SPREAD",
        'data.sources=[{path: "builtin:shapes", format: shapes, seed: 0, limit: 48}]',
        "precompute.batch_size=16",
        "distill.batch_size=4", f"distill.steps={steps}", "distill.checkpoint_every=4", "distill.fake_updates=1",
        "distill.lora.rank=4", "distill.validation.num_prompts=0", "distill.log_every=1",
        "evaluate.num_prompts=4", "evaluate.teacher_num_prompts=2", "evaluate.teacher_steps=8",
        "evaluate.latency_repeats=1", "evaluate.grid_prompts=2",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    # Every port free-picked: the session's cluster (conftest) and other local clusters already
    # hold the defaults (dashboard agent 52365, client server 10001, ...), and a node whose agent
    # cannot bind answers every submission with "No available agent to submit job".
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head():
    """A head and a worker node, 2 CPUs each, each `ray start --block` in its own process group:
    stopping them stops only this cluster (`ray stop` would also take down any other local one,
    e.g. the session fixture's). Yields (dashboard address, environment for the `ray` CLI)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the conftest's loopback-only switch; a `ray start` head does without
    # A real CPU cluster's nodes have no DeepSpeed switch in their environment: the job's
    # workers must get it from the stage itself (pipelines/ray_runtime.worker_env).
    env.pop("DS_ACCELERATOR", None)
    # Head and client agree on no token auth (a token file left in ~/.ray by another local cluster
    # would otherwise switch the head to token auth while the CLI sends none).
    env["RAY_AUTH_MODE"] = "disabled"
    gcs, dash = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"ray-job-{os.getpid()}"  # short: Ray's socket paths have a length limit
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
              "--disable-usage-stats"]
    head = ["ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={_free_port()}", *common, *_node_ports()]
    worker = ["ray", "start", f"--address=127.0.0.1:{gcs}", *common, *_node_ports()]
    procs = [subprocess.Popen(head, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(lambda: _get(address, "/api/version") is not None, procs, "ray head")
        procs.append(subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        _wait_for(lambda: len(_alive_nodes(address)) == 2, procs, "the worker node")
        yield address, env
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _get(address: str, path: str):
    try:
        r = requests.get(f"{address}{path}", timeout=5)
    except requests.RequestException:
        return None
    return r.json() if r.status_code == 200 else None


def _alive_nodes(address: str) -> list[dict]:
    body = _get(address, "/api/v0/nodes?detail=1") or {}
    nodes = body.get("data", {}).get("result", {}).get("result", [])
    return [n for n in nodes if n.get("state") == "ALIVE"]


def _wait_for(ready, procs: list[subprocess.Popen], what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert all(p.poll() is None for p in procs), f"ray start exited early while waiting for {what}"
        assert time.time() < deadline, f"{what} did not come up within {timeout:.0f} s"
        time.sleep(1)


def _ray(env, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _submit(address: str, env, entrypoint: list[str], *options: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = ["job", "submit", "--address", address, "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
           *options, "--", *entrypoint]
    for _ in range(12):  # the head's job agent may start a few seconds after its dashboard answers
        proc = _ray(env, *cmd, timeout=timeout)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def _job(address: str, submission_id: str) -> dict:
    job = _get(address, f"/api/jobs/{submission_id}")
    assert job is not None, f"the dashboard does not know job {submission_id}"
    return job


def _logs(address: str, submission_id: str) -> str:
    return (_get(address, f"/api/jobs/{submission_id}/logs") or {}).get("logs", "")


def _pipeline(definition_sets: list[str], *extra: str) -> list[str]:
    return ["python", "pipelines/distill.py", "--config", TOY, *definition_sets, *extra]


def test_dry_run_submitted_as_a_ray_job(ray_head):
    address, env = ray_head
    proc = _submit(address, env, ["python", "pipelines/distill.py", "--config",
                                  "pipelines/configs/sd35_medium_6step.yaml", "--dry-run"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert "scales [32, 48, 64, 80, 96, 128]" in out
    assert "sigmas [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022]" in out


def _checkpoint_states(run_dir: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((run_dir / "train").glob("**/checkpoint_*/state.json"))]


def test_whole_toy_pipeline_as_one_ray_job(ray_head, tmp_path):
    address, env = ray_head
    job_id = f"swd-e2e-{os.getpid()}"
    proc = _submit(address, env, _pipeline(short_toy(tmp_path, "e2e")), "--submission-id", job_id)
    out = proc.stdout + proc.stderr
    job = _job(address, job_id)
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{out[-6000:]}"
    assert proc.returncode == 0, out[-3000:]
    logs = _logs(address, job_id)
    for stage in ("precompute", "distill", "evaluate"):
        assert f"[{stage}] starting" in logs
    assert "done: ran precompute, distill, evaluate" in logs
    run_dir = tmp_path / "e2e"

    # precompute: every row of the 48 made it into the store
    manifest = json.loads((run_dir / "store" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 48

    # distill: both workers trained, one on each node, to the last step
    states = _checkpoint_states(run_dir)
    assert [s["step"] for s in states][-1] == 8
    assert len({w["node_id"] for w in states[-1]["workers"]}) == 2
    assert "step 8/8" in logs and "resumed from checkpoint" not in logs

    # the exported student: a diffusers folder the stock pipeline loads, with its schedule
    merged = run_dir / "student" / "merged"
    index = json.loads((merged / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert list((merged / "transformer").glob("*.safetensors")), "no transformer weights in the export"
    assert json.loads((merged / "swd_schedule.json").read_text())["scales"] == [8, 10, 12, 16]
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(merged, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32)
    assert type(pipe.scheduler).__name__ == "FlowMatchLCMScheduler"

    # evaluate: the report covers the teacher baselines and this student, with scores and latency
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["student"]["found"] and report["student"]["uri"] == str(merged)
    models = {m["name"]: m for m in report["models"]}
    assert set(models) == {"teacher_8_cfg", "teacher_4", "swd_4"}
    assert models["swd_4"]["n_prompts"] == 4 and models["teacher_8_cfg"]["n_prompts"] == 2
    for m in models.values():
        assert 0 <= m["prompt_accuracy"] <= 1 and m["fd"] >= 0 and m["latency"]["total_s"] > 0
    assert {c["id"] for c in report["checks"]} >= {"student_beats_teacher_few_step_fd", "student_latency_vs_teacher_cfg"}
    assert (run_dir / "eval" / "report.md").exists() and (run_dir / "eval" / "grid.png").exists()


def _wait_for_checkpoint(address: str, job_id: str, run_dir: Path, timeout: float = 400) -> None:
    """Until Ray Train has registered a checkpoint (its snapshot names one); files in storage alone
    may belong to a checkpoint still being reported."""
    snapshot = run_dir / "train" / "distill" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        job = _job(address, job_id)
        assert job["status"] in ("PENDING", "RUNNING"), \
            f"job ended ({job['status']}) before a checkpoint: {job.get('message')}\n{_logs(address, job_id)[-6000:]}"
        assert time.time() < deadline, f"no checkpoint within {timeout:.0f} s\n{_logs(address, job_id)[-6000:]}"
        time.sleep(1)


def test_stopped_job_submitted_again_resumes_from_its_checkpoint(ray_head, tmp_path):
    address, env = ray_head
    # 48 steps: long enough that the job is still training when it is stopped after its first checkpoint
    definition = short_toy(tmp_path, "resume", steps=48)
    entrypoint = _pipeline(definition, "--stages", "precompute,distill")
    first, second = f"swd-stop-{os.getpid()}", f"swd-resume-{os.getpid()}"
    proc = _submit(address, env, entrypoint, "--submission-id", first, "--no-wait", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = tmp_path / "resume"
    _wait_for_checkpoint(address, first, run_dir)

    stop = _ray(env, "job", "stop", "--address", address, first, timeout=120)
    assert stop.returncode == 0, (stop.stdout + stop.stderr)[-3000:]
    assert _job(address, first)["status"] == "STOPPED"
    stopped_at = max(s["step"] for s in _checkpoint_states(run_dir))
    assert stopped_at < 48, "the job finished before it was stopped: nothing to resume"
    assert "step 48/48" not in _logs(address, first)

    proc = _submit(address, env, entrypoint, "--submission-id", second)
    job = _job(address, second)
    assert job["status"] == "SUCCEEDED", f"{job['status']}: {job.get('message')}\n{(proc.stdout + proc.stderr)[-6000:]}"
    logs = _logs(address, second)
    # the store was complete: nothing encoded again
    assert "kept 0 new rows" in logs and "skipped 48 already present" in logs
    # training went on from the last registered checkpoint, not from step 1
    resumed = [line for line in logs.splitlines() if "resumed from checkpoint at step" in line]
    assert resumed, logs[-6000:]
    step = int(resumed[0].rsplit("at step ", 1)[1].split(";")[0])
    assert 4 <= step <= stopped_at and step % 4 == 0
    assert f"step {step + 1}/48" in logs and "step 1/48" not in logs and "step 48/48" in logs
    assert max(s["step"] for s in _checkpoint_states(run_dir)) == 48
    assert (run_dir / "student" / "merged" / "model_index.json").exists()
