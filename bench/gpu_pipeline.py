"""The toy definition end to end through Ray on one machine, every stage on the device it
reserves: precompute, distill (2 Ray Train workers), evaluate, then deploy and HTTP requests.

    python bench/gpu_pipeline.py --device cuda                -> bench/results/gpu_pipeline.json
    python bench/gpu_pipeline.py --device cpu --quick --out X  (the same code path, tiny; a test runs it)
    python bench/gpu_pipeline.py ... --address HOST:PORT        (on a running cluster instead of its own)

With `--device cuda` every stage reserves a fraction of the one GPU (precompute actors, the two
training workers, the evaluate task and the Serve replica hold 0.25 each), so the whole pipeline
shares it as it would share a GPU node. For each stage the JSON records the device its model
ran on, as the stage itself reports it (the precompute encoders, each training rank's
state.json, the evaluate report, the replica's `/v1/models` entry), and its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402

TOY = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "toy.yaml"
GPU_SHARE = 0.25  # of the one GPU, per actor / worker / task / replica


def overrides(device: str, storage: str, quick: bool) -> list[str]:
    sets = [f"resources.storage={storage}", "resources.num_workers=2"]
    if device == "cuda":
        sets += [f"precompute.gpus_per_actor={GPU_SHARE}", f"resources.gpus_per_worker={GPU_SHARE}",
                 f"evaluate.gpus={GPU_SHARE}", f"serve.gpus_per_replica={GPU_SHARE}"]
    if quick:  # the same stages and code paths, seconds instead of minutes
        sets += ["data.sources=[{path: 'builtin:shapes', format: shapes, seed: 0, limit: 16}]",
                 "distill.steps=4", "distill.checkpoint_every=4", "distill.batch_size=4",
                 "distill.validation.num_prompts=0", "distill.log_every=1",
                 "evaluate.num_prompts=2", "evaluate.teacher_num_prompts=2", "evaluate.teacher_steps=2",
                 "evaluate.latency_repeats=1", "evaluate.grid_prompts=2", "evaluate.batch_size=2"]
    return sets


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_requests(cfg, count: int) -> dict:
    """Deploy the exported student with Serve on 127.0.0.1 and send `count` requests, one at a
    time (each its own seed): the device the replica reports, latencies and any error."""
    import requests
    from ray import serve

    from pipelines.serve import build_app

    start = time.perf_counter()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
    from pipelines.ray_compat import serve_http_address

    host, port = serve_http_address()
    serve.run(build_app(cfg), name="swd-gpu-pipeline", route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    deadline = time.time() + 600
    while True:  # until the replica has loaded the student
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                models = requests.get(f"{url}/v1/models", timeout=10).json()["data"]
                if models:
                    break
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"the Serve app at {url} did not come up in 600 s")
        time.sleep(1)
    deployed = time.perf_counter() - start
    latencies, errors = [], []
    with requests.Session() as session:
        for i in range(count):
            t0 = time.perf_counter()
            r = session.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "seed": i}, timeout=600)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200 or not r.json().get("data"):
                errors.append(f"{r.status_code}: {r.text[:200]}")
    serve.delete("swd-gpu-pipeline")
    serve.shutdown()
    return {"device": models[0].get("device"), "model": models[0]["id"], "deploy_seconds": deployed,
            "requests": count, "errors": errors, "latencies_s": latencies,
            "median_latency_s": statistics.median(latencies) if latencies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny data and iterations (the CPU check)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--storage", help="where the run writes (default: a temporary folder)")
    p.add_argument("--out", help="result file (default bench/results/gpu_pipeline.json)")
    p.add_argument("--address", help="a running Ray cluster to join (default: start one on this machine)")
    args = p.parse_args(argv)

    import ray
    import torch

    from pipelines.schema import load_pipeline_config
    from pipelines.stages import run_stage

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here (use --device cpu)")
    storage = args.storage or tempfile.mkdtemp(prefix="swd-gpu-pipeline-")
    sets = overrides(args.device, storage, args.quick)
    cfg = load_pipeline_config(TOY, sets)
    if not ray.is_initialized():
        from pipelines.ray_runtime import worker_env

        common = {"logging_level": "WARNING", "runtime_env": {"env_vars": worker_env()}}
        if args.address:
            ray.init(address=args.address, **common)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=1 if args.device == "cuda" else 0,
                     include_dashboard=False, **common)
    stages, total = {}, time.perf_counter()
    for stage in ("precompute", "distill", "evaluate"):
        t0 = time.perf_counter()
        out = run_stage(stage, cfg)
        entry = {"seconds": time.perf_counter() - t0}
        if stage == "precompute":
            entry.update(device=out["device"], rows=out["rows"])
        elif stage == "distill":
            entry.update(devices=sorted({w["device"] for w in out["workers"]}), workers=out["workers"],
                         steps=cfg.distill.steps)
        else:
            report = json.loads(Path(out["report_json"]).read_text())
            entry.update(device=out["device"], models={m["name"]: {k: m.get(k) for k in ("prompt_accuracy", "fd")}
                                                       for m in report["models"]})
        stages[stage] = entry
        print(f"[gpu_pipeline] {stage}: {json.dumps({k: v for k, v in entry.items() if k != 'workers'})}", flush=True)
    t0 = time.perf_counter()
    stages["deploy"] = {**serve_requests(cfg, args.requests), "seconds": time.perf_counter() - t0}
    print(f"[gpu_pipeline] deploy: device {stages['deploy']['device']}, {args.requests} requests, "
          f"{len(stages['deploy']['errors'])} errors, median {stages['deploy']['median_latency_s']:.3f} s", flush=True)
    payload = {"device": args.device, "quick": args.quick,
               "gpu_share_per_unit": GPU_SHARE if args.device == "cuda" else 0,
               "definition": str(TOY.relative_to(TOY.parents[2])), "overrides": sets, "stages": stages,
               "total_seconds": time.perf_counter() - total}
    path = write_result("gpu_pipeline", payload, path=Path(args.out) if args.out else None)
    print(f"[gpu_pipeline] wrote {path}", flush=True)
    return 1 if stages["deploy"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
