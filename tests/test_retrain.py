"""Scheduled retraining end to end on a real local 2-node Ray cluster with the committed toy
teacher: cycles that are versions in an MLflow registry, a gate, promotion, Serve following the
champion under load, rollback, and the lock between two cycles of one definition."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from pipelines.schema import parse_pipeline_config
from tests.conftest import free_port
from tests.http_load import Load

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray
APP, ROUTE = "swd-retrain-test", "/retrain-test"


def definition(tmp: Path, rows: int, margin: float = -1e9) -> dict:
    return {
        "name": "nightly",
        "stages": ["precompute", "distill"],
        "teacher": {"path": "builtin:toy-sd3", "max_sequence_length": 0},
        "data": {"sources": [{"path": "builtin:shapes", "format": "shapes", "limit": rows}],
                 "preview_prompts": ["a red circle"]},
        "precompute": {"batch_size": 16, "actors": 1, "cpus_per_actor": 1},
        "distill": {
            "schedule": {"scales": [8, 16], "boundaries": [0, 14]},
            "losses": {"feature_block": 4, "dmd": {"guidance_scale": 4.5}},
            "lora": {"rank": 4}, "batch_size": 4, "steps": 2, "lr": 1e-3, "fake_updates": 1,
            "checkpoint_every": 2, "log_every": 1,
        },
        "evaluate": {"metric_models": {"clip": str(tmp / "tiny-clip")}},  # written by the test
        "serve": {"app_name": APP, "route_prefix": ROUTE, "host": "127.0.0.1", "max_batch_size": 2,
                  "max_ongoing_requests": 4, "cpus_per_replica": 0.5},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "SPREAD",
                      "storage": str(tmp / "runs")},
        "retrain": {
            "schedule": "0 3 * * *", "timezone": "Europe/Berlin", "steps": 2,
            # a negative margin is a tolerance: the short cycles here pass unless `margin` is raised
            "gate": {"num_prompts": 8, "batch_size": 8, "grid_prompts": 2,
                     "metrics": [{"name": "fd", "min_margin": margin},
                                 {"name": "clip_score", "min_margin": margin}]},
            "lock_ttl_s": 10,
        },
    }


def write(tmp: Path, d: dict) -> Path:
    path = tmp / "nightly.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def served_models(base: str) -> list[str]:
    return [m["id"] for m in requests.get(f"{base}{ROUTE}/v1/models", timeout=30).json()["data"]]


def generate(base: str):
    return lambda: requests.post(f"{base}{ROUTE}/v1/images/generations", json={"prompt": "a red circle", "seed": 3},
                                 timeout=120)


def switch_to(load: Load, base: str, model: str, timeout: float = 60) -> list:
    """Wait until the app reports `model`, then for three requests sent after that; all three
    must come from `model` (the swap is an in-place reconfigure of the one replica)."""
    deadline = time.monotonic() + timeout
    while served_models(base) != [model]:
        assert time.monotonic() < deadline, f"serving never moved to {model}"
        time.sleep(0.5)
    after = load.wait_for(3, sent_after=time.monotonic())
    assert [o.model for o in after] == [model] * len(after), [(o.status, o.model, o.error) for o in after]
    return after


def replica_pids() -> dict[str, int]:
    """Each replica of the app (Serve's named replica actors, one name per replica) and its pid."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#")]
    return {n: ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(lambda _: os.getpid())) for n in names}


def check_no_restart(load: Load, before: dict[str, int]) -> None:
    """A promotion or rollback is a reconfigure in place: the same replica processes, and no
    request waits for a new replica (one took 35 s when the swap restarted them)."""
    assert replica_pids() == before, (before, replica_pids())
    assert {n.split("#")[1] for n in before} == {"Generator", "Ingress"}
    times = sorted(o.seconds for o in load.outcomes)
    assert times[-1] < max(5 * times[len(times) // 2], 8.0), times  # a few batch times at most


def retrain_cli(path: Path, *args, cluster=None, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"RAY_ADDRESS": cluster.address} if cluster else {}))
    return subprocess.run([sys.executable, "pipelines/retrain.py", *args, "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def checkpoint_steps(cycle_dir: Path) -> list[int]:
    return sorted(json.loads(f.read_text())["step"] for f in (cycle_dir / "train").glob("**/checkpoint_*/state.json"))


def test_cycles_promote_serve_refuse_roll_back_and_lock(tmp_path, ray_cluster):
    from ray import serve

    from pipelines.ray_compat import serve_http_address
    from pipelines.retraining.cycle import CycleRefused, lock_uri, run_cycle
    from pipelines.retraining.registry import Registry
    from swd_core.tiny_models import save_tiny_clip

    save_tiny_clip(tmp_path / "tiny-clip")  # the gate's CLIP score model: random weights, read by path
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        # cycle 1: v1 from the teacher, promoted (no champion yet) and deployed
        cfg = parse_pipeline_config(definition(tmp_path, rows=64))
        write(tmp_path, definition(tmp_path, rows=64))
        first = run_cycle(cfg)
        assert first["cycle"] == "cycle-0001" and first["version"] == 1 and first["promoted"]
        assert first["new_rows"] == 64 and first["warm_start"] is None
        _, port = serve_http_address()
        base = f"http://127.0.0.1:{port}"
        assert served_models(base) == ["nightly-swd-v1"]
        run_dir = tmp_path / "runs" / "nightly"
        assert checkpoint_steps(run_dir / "cycles" / "cycle-0001") == [2]

        # more rows arrive; cycle 2 encodes only those, trains v1 further, passes and is served
        cfg = parse_pipeline_config(definition(tmp_path, rows=96))
        pids = replica_pids()
        with Load(generate(base), pause=0.5) as load:
            load.wait_for(1)  # the load is on v1 before the cycle starts
            second = run_cycle(cfg)
            switch_to(load, base, "nightly-swd-v2")  # and continues on v2
        check_no_restart(load, pids)  # new data changed the definition, not what a replica runs
        assert second["new_rows"] == 32 and second["rows"] == 96
        assert second["warm_start"] == first["checkpoint"] and second["start_step"] == 2
        assert checkpoint_steps(run_dir / "cycles" / "cycle-0002") == [4]  # went on from step 2, not from 0
        assert second["promoted"] and set(second["gate"]["champion"]) == {"fd", "clip_score"}
        assert second["gate"]["seeds"] == first["gate"]["seeds"]
        assert second["gate"]["prompts"] == first["gate"]["prompts"]
        assert not load.failures(), load.failures()[:5]  # connection errors included
        assert {o.model for o in load.outcomes} == {"nightly-swd-v1", "nightly-swd-v2"}
        # v1's folder is untouched: every cycle exports into its own
        assert (run_dir / "cycles" / "cycle-0001" / "student" / "merged" / "model_index.json").exists()

        # cycle 3, from the command line: no new rows, so only --force trains; it cannot pass (a
        # margin no model meets, given with --set): registered, not promoted, serving stays on v2.
        # Stopped by SIGTERM as it starts, it releases the lock (exit 143, one line); started again,
        # it takes the lock, and a cycle started meanwhile finds it and changes nothing.
        hard = definition(tmp_path, rows=96)
        path = write(tmp_path, hard)
        hard["retrain"]["gate"]["metrics"] = [{"name": "fd", "min_margin": 1e9},
                                              {"name": "clip_score", "min_margin": 1e9}]
        margin = ["--set", "retrain.gate.metrics=[{name: fd, min_margin: 1e9}, {name: clip_score, min_margin: 1e9}]"]

        def cycle3():
            return subprocess.Popen([sys.executable, "pipelines/retrain.py", "--once", "--force",
                                     "--config", str(path), *margin],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS=ray_cluster.address))

        lock = Path(lock_uri(cfg))
        stopped, lines = cycle3(), []
        for line in stopped.stdout:
            lines.append(line)
            if "[retrain] cycle-0003" in line:  # it holds the lock
                stopped.send_signal(signal.SIGTERM)
                break
        out_stopped = "".join(lines) + stopped.communicate(timeout=300)[0]
        assert stopped.returncode == 143, out_stopped[-4000:]
        assert out_stopped.count("[retrain] SIGTERM received: stopping") == 1, out_stopped[-4000:]
        assert "SIGTERM received at time" not in out_stopped and "Traceback" not in out_stopped, out_stopped[-4000:]
        assert not lock.exists()  # released, not left to expire
        third = cycle3()
        deadline = time.time() + 120
        while not lock.exists():
            assert time.time() < deadline and third.poll() is None, "cycle 3 never took the lock"
            time.sleep(0.1)
        with pytest.raises(CycleRefused, match="another retraining cycle of 'nightly' is running"):
            run_cycle(parse_pipeline_config(hard))
        out3, _ = third.communicate(timeout=600)
        assert third.returncode == 0, out3[-4000:]
        assert "store: 96 rows, 0 new this cycle" in out3 and "training 2 steps from v2's checkpoint" in out3
        result = json.loads((run_dir / "cycles" / "cycle-0003" / "cycle.json").read_text())
        assert result["cycle"] == "cycle-0003" and result["version"] == 3 and not result["promoted"]
        assert result["new_rows"] == 0 and result["rows"] == 96
        assert sorted(p.name for p in (run_dir / "cycles").iterdir()) == ["cycle-0001", "cycle-0002", "cycle-0003"]
        assert served_models(base) == ["nightly-swd-v2"]
        registry = Registry(cfg)
        assert registry.champion().number == 2
        assert "FAIL" in registry.version(3).tags["gate_report"] and registry.version(3).tags["gate"] == "failed"

        # rollback moves the champion, and serving, back to v1
        with Load(generate(base), pause=0.5) as load:
            load.wait_for(1)
            rb = retrain_cli(path, "rollback", cluster=ray_cluster)
            assert rb.returncode == 0, rb.stdout + rb.stderr
            switch_to(load, base, "nightly-swd-v1")
        assert not load.failures(), load.failures()[:5]
        check_no_restart(load, pids)
        assert {o.model for o in load.outcomes} == {"nightly-swd-v2", "nightly-swd-v1"}
        assert Registry(cfg).champion().number == 1

        # the registry: every version with its metrics, and the alias history
        st = retrain_cli(path, "status")
        assert st.returncode == 0, st.stderr
        lines = st.stdout.splitlines()
        rows = [line for line in lines if re.match(r"^[* ]v\d+ +cycle-", line)]
        assert [r[1:].split()[0] for r in rows] == ["v1", "v2", "v3"]
        assert "passed" in rows[1] and "failed" in rows[2] and rows[0].startswith("*v1")
        history = [line for line in lines if re.match(r"^  \S+ \S+  v\d+", line)]
        assert [re.match(r"^  \S+ \S+  (v\d+)", h).group(1) for h in history] == ["v1", "v2", "v1"]
        assert "rollback from v2" in history[-1] and "cycle-0002: gate passed" in history[1]
        versions = Registry(cfg).versions()
        assert all(set(json.loads(v.tags["metrics"])) == {"fd", "clip_score"} for v in versions)
        clip = json.loads(versions[2].tags["intervals"])["clip_score"]  # each metric with its interval
        assert clip["lo"] <= clip["value"] <= clip["hi"] and clip["n"] == 8
        assert set(json.loads(versions[2].tags["differences"])) == {"fd", "clip_score"}
        # MLflow runs: one per cycle, with per-step training metrics and the gate's
        client = Registry(cfg).client
        runs = client.search_runs([Registry(cfg).experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["cycle-0001", "cycle-0002", "cycle-0003"]
        run2 = next(r for r in runs if r.info.run_name == "cycle-0002")
        assert "gate.candidate.fd" in run2.data.metrics and "gate.champion.fd" in run2.data.metrics
        assert [m.step for m in client.get_metric_history(run2.info.run_id, "generator")] == [3, 4]
        # that run is the cycle's distill run, and the version it registered links to it
        assert run2.data.params["distill.steps"] == "4" and run2.data.params["cycle"] == "cycle-0002"
        assert client.get_model_version("nightly", "2").run_id == run2.info.run_id
        assert run2.data.tags["student"].endswith("cycles/cycle-0002/student/merged")

        # no new rows (retrain.min_new_rows 1): a cycle changes nothing, no folder, no version
        idle = retrain_cli(path, "--once", cluster=ray_cluster)
        assert idle.returncode == 0, idle.stdout + idle.stderr
        assert "0 new rows < retrain.min_new_rows 1: nothing to train" in idle.stdout + idle.stderr
        assert len(list((run_dir / "cycles").iterdir())) == 3 and len(Registry(cfg).versions()) == 3
    finally:
        serve.delete(APP)
