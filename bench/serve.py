"""Serving throughput and latency over HTTP on 127.0.0.1: dynamic batching vs max_batch_size=1,
and errors during a hot swap.

    python bench/serve.py [--concurrency 16 --requests 160 --batch 16 --cpus 2]
    -> bench/results/serve.json

Starts its own local Ray and Serve, exports two stand-in students (the toy teacher in the
student format, one perturbed; pipelines/serve/stand_in.py) and drives the app with a bounded
load generator: `concurrency` client threads share a fixed number of POST
/v1/images/generations requests, each with its own seed. The same load runs against the app
with batching (`--batch`) and with max_batch_size=1; then, with batching, again while the
generator is pointed at the second student (the hot swap), counting every non-200 response.

`--single N` (and `--single-only`, which skips the load runs): N requests one after another, no
concurrency, against the app with `serve.deterministic_batching` off (a lone request is a batch
of one) and on (every batch padded to `--batch` rows): what a request costs under light load.

    python bench/serve.py --single-only --single 30 --batch 8 --result serve_single
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep Ray's addresses on the loopback interface (this benchmark never leaves 127.0.0.1).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from bench.common import write_result  # noqa: E402

PROMPT = "a large red circle in the center on a white background"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def drive(url: str, concurrency: int, count: int, first_seed: int = 0, during=None) -> dict:
    """`count` requests from `concurrency` threads; `during()` runs alongside (the swap)."""
    latencies, codes, lock = [], [], threading.Lock()
    next_index = iter(range(count))

    def client():
        session = requests.Session()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                r = session.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "seed": first_seed + i},
                                 timeout=120)
                code = r.status_code
            except requests.RequestException as err:
                code = type(err).__name__
            with lock:
                latencies.append(time.perf_counter() - start)
                codes.append(code)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency + 1) as pool:
        clients = [pool.submit(client) for _ in range(concurrency)]
        side = pool.submit(during) if during else None
        for c in clients:
            c.result()
        side_result = side.result() if side else None
    wall = time.perf_counter() - start
    ok = [lat for lat, c in zip(latencies, codes) if c == 200]
    errors = {str(c): codes.count(c) for c in set(codes) if c != 200}
    return {
        "requests": count, "concurrency": concurrency, "wall_s": wall, "rps": len(ok) / wall,
        "p50_ms": 1000 * percentile(ok, 50) if ok else None, "p99_ms": 1000 * percentile(ok, 99) if ok else None,
        "errors": sum(errors.values()), "error_codes": errors, "latencies_ms": [round(1000 * x, 2) for x in latencies],
        "side": side_result,
    }


def single_summary(args, single: dict) -> dict:
    off, on = single["as_arrived"], single["deterministic"]
    return {"requests_per_setting": args.single, "concurrency": 1, "max_batch_size": args.batch,
            "median_ms_as_arrived": off["median_ms"], "median_ms_deterministic": on["median_ms"],
            "ratio_deterministic_to_as_arrived": on["median_ms"] / off["median_ms"], "runs": single}


def write_single(args, base_cfg, single: dict) -> int:
    path = write_result(args.result, {
        **single_summary(args, single),
        "settings": {**vars(args), "model": "toy-sd3 transformer exported as a student (stand-in)",
                     "schedule": list(base_cfg.schedule().scales), "endpoint": "POST /v1/images/generations"},
    })
    print(f"[bench] wrote {path}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched run")
    parser.add_argument("--wait", type=float, default=0.05, help="batch_wait_timeout_s")
    parser.add_argument("--cpus", type=float, default=2,
                        help="CPUs (= torch threads) of the generator replica, the same in both runs "
                             "(2 = this machine's cores; 1 leaves a core for the clients, proxy and ingress)")
    parser.add_argument("--result", default="serve", help="result name: bench/results/<result>.json")
    parser.add_argument("--single", type=int, default=20,
                        help="sequential single requests per setting of deterministic_batching (0: none)")
    parser.add_argument("--single-only", action="store_true", help="only the single-request latencies")
    args = parser.parse_args()

    import ray
    from ray import serve

    from pipelines.schema import load_pipeline_config
    from pipelines.serve import build_app
    from pipelines.serve.stand_in import export_stand_in

    base_cfg = load_pipeline_config(Path(__file__).resolve().parents[1] / "pipelines/configs/toy.yaml")
    tmp = Path(tempfile.mkdtemp(prefix="swd-bench-serve-"))
    print("[bench] exporting two stand-in students", flush=True)
    students = {"a": str(export_stand_in(base_cfg, tmp / "a")), "b": str(export_stand_in(base_cfg, tmp / "b", 1.0, 1))}

    def cfg_for(batch: int, model: str, deterministic: bool = False):
        serve_cfg = {"model": model, "app_name": "swd-bench", "route_prefix": "/bench", "host": "127.0.0.1",
                     "deterministic_batching": deterministic,
                     "max_batch_size": batch, "batch_wait_timeout_s": args.wait if batch > 1 else 0.0,
                     "max_ongoing_requests": max(batch, args.concurrency), "max_queued_requests": 4 * args.concurrency,
                     "cpus_per_replica": args.cpus}
        return base_cfg.model_copy(update={"serve": base_cfg.serve.model_validate(serve_cfg)})

    ray.init(address="local", num_cpus=max(2, int(args.cpus)), include_dashboard=False, logging_level="WARNING")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
    from pipelines.ray_compat import serve_http_address

    url = f"http://127.0.0.1:{serve_http_address()[1]}/bench"
    runs, single = {}, {}
    try:
        for deterministic in (False, True) if args.single else ():
            name = "deterministic" if deterministic else "as_arrived"
            serve.run(build_app(cfg_for(args.batch, students["a"], deterministic)), name="swd-bench",
                      route_prefix="/bench", blocking=False)
            drive(url, 1, 5, first_seed=10**6)  # warm-up, not counted
            print(f"[bench] single requests, deterministic_batching={deterministic}: {args.single} requests",
                  flush=True)
            r = drive(url, 1, args.single)
            single[name] = {"deterministic_batching": deterministic, "requests": args.single, "errors": r["errors"],
                            "latencies_ms": r["latencies_ms"], "median_ms": statistics.median(r["latencies_ms"])}
            print(f"[bench] median {single[name]['median_ms']:.0f} ms, errors {r['errors']}", flush=True)
        if args.single_only:
            return write_single(args, base_cfg, single)
        for name, batch in (("unbatched", 1), ("batched", args.batch)):
            cfg = cfg_for(batch, students["a"])
            serve.run(build_app(cfg), name="swd-bench", route_prefix="/bench", blocking=False)
            drive(url, args.concurrency, 2 * args.concurrency, first_seed=10**6)  # warm-up, not counted
            print(f"[bench] {name}: {args.requests} requests, {args.concurrency} clients", flush=True)
            runs[name] = drive(url, args.concurrency, args.requests)
            print(f"[bench] {name}: {runs[name]['rps']:.2f} req/s, p50 {runs[name]['p50_ms']:.0f} ms, "
                  f"p99 {runs[name]['p99_ms']:.0f} ms, errors {runs[name]['errors']}", flush=True)

        def swap():
            time.sleep(1.0)
            start = time.perf_counter()
            serve.run(build_app(cfg_for(args.batch, students["b"])), name="swd-bench", route_prefix="/bench",
                      blocking=False)
            while requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["source"] != students["b"]:
                time.sleep(0.05)
            return {"swap_s": time.perf_counter() - start, "from": students["a"], "to": students["b"]}

        print("[bench] batched, hot swap during the load", flush=True)
        runs["swap"] = drive(url, args.concurrency, args.requests, during=swap)
        print(f"[bench] swap: {runs['swap']['rps']:.2f} req/s, errors {runs['swap']['errors']}, "
              f"swap took {runs['swap']['side']['swap_s']:.1f} s", flush=True)
    finally:
        serve.delete("swd-bench")
        serve.shutdown()
        ray.shutdown()

    b, u = runs["batched"], runs["unbatched"]
    path = write_result(args.result, {
        "rps_batched": b["rps"], "rps_unbatched": u["rps"], "ratio": b["rps"] / u["rps"],
        "p50_ms": b["p50_ms"], "p99_ms": b["p99_ms"],
        "p50_ms_unbatched": u["p50_ms"], "p99_ms_unbatched": u["p99_ms"],
        "errors": b["errors"] + u["errors"], "errors_during_swap": runs["swap"]["errors"],
        "rps_during_swap": runs["swap"]["rps"], "swap": runs["swap"]["side"],
        "settings": {**vars(args), "model": "toy-sd3 transformer exported as a student (stand-in)",
                     "schedule": list(base_cfg.schedule().scales), "endpoint": "POST /v1/images/generations"},
        "runs": runs, **({"single_request": single_summary(args, single)} if single else {}),
    })
    print(f"[bench] ratio {b['rps'] / u['rps']:.2f}; wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
