"""Reading the store in Ray Train workers: Ray Data's V1 Parquet reader against V2 (Ray 2.60's
default), as the distill stage reads it: two actors at once, each its own files of one store, a
fresh dataset execution per pass.

    python bench/store_read.py [--rows 135] [--rounds 4]
    -> bench/results/store_read.json

A round starts two new actors (as a Ray Train run starts its workers) and times, in each, the
first batch of a fresh `read_parquet` of its files, then the whole pass; then a second execution
in the same actors (a later epoch that streams again). Readers alternate round by round, so
neither gets the warmer machine. The store is the toy teacher's, built by the precompute stage
with the distill tests' definition (135 rows in three files).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from bench.common import median, write_result


def build_store(root: Path, rows: int):
    from pipelines.schema import parse_pipeline_config
    from pipelines.stages import precompute
    from pipelines.store import open_store

    cfg = parse_pipeline_config({
        "name": "store-read", "teacher": {"path": "builtin:toy-sd3", "max_sequence_length": 0},
        "data": {"sources": [{"path": "builtin:shapes", "format": "shapes", "limit": rows}]},
        "precompute": {"batch_size": 16, "actors": 1, "cpus_per_actor": 1, "output": str(root / "store")},
        "distill": {"schedule": {"scales": [8, 16], "boundaries": [0, 14]}},
        "resources": {"storage": str(root / "runs")},
    })
    precompute.run(cfg)
    return open_store(cfg)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=135)
    p.add_argument("--rounds", type=int, default=4, help="rounds per reader")
    p.add_argument("--out", default="store_read", help="name under bench/results/")
    args = p.parse_args(argv)

    import ray

    from pipelines.ray_runtime import worker_env

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": worker_env()})
    try:
        store = build_store(Path(tempfile.mkdtemp(prefix="swd-store-read-")), args.rows)
        files = store.files()
        halves = [files[: len(files) // 2 + 1], files[len(files) // 2 + 1:]] if len(files) > 1 else [files, files]

        @ray.remote(num_cpus=1)
        class Reader:
            def passes(self, v2: bool, paths: list[str]) -> dict:
                import ray.data

                ctx = ray.data.DataContext.get_current()
                out = {}
                for name in ("first_execution", "second_execution"):
                    ctx.use_datasource_v2 = v2
                    start = time.perf_counter()
                    # the call `Store.dataset` makes, with the reader under test
                    ds = ray.data.read_parquet(paths, filesystem=_filesystem(store))
                    batches = iter(ds.iterator().iter_batches(batch_size=None, batch_format="numpy"))
                    next(batches)
                    first = time.perf_counter() - start
                    rest = sum(1 for _ in batches)
                    out[name] = {"first_batch_s": round(first, 3), "pass_s": round(time.perf_counter() - start, 3),
                                 "blocks": rest + 1}
                return out

        raw = {"v1": [], "v2": []}
        for r in range(args.rounds * 2):
            reader = "v2" if r % 2 == 0 else "v1"
            actors = [Reader.options(scheduling_strategy="SPREAD").remote() for _ in halves]
            start = time.perf_counter()
            per_actor = ray.get([a.passes.remote(reader == "v2", h) for a, h in zip(actors, halves)])
            raw[reader].append({"round": r, "wall_s": round(time.perf_counter() - start, 3), "actors": per_actor})
            for a in actors:
                ray.kill(a)
            print(f"round {r} {reader}: {raw[reader][-1]}", flush=True)
    finally:
        ray.shutdown()

    def summary(reader: str, execution: str, key: str) -> dict:
        values = [a[execution][key] for rnd in raw[reader] for a in rnd["actors"]]
        return {"median": median(values), "min": min(values), "max": max(values)}

    result = {
        "command": "python bench/store_read.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows, "files": len(files), "rounds_per_reader": args.rounds,
        "summary": {reader: {execution: {key: summary(reader, execution, key) for key in ("first_batch_s", "pass_s")}
                             for execution in ("first_execution", "second_execution")} for reader in raw},
        "raw": raw,
    }
    write_result(args.out, result)
    return result


def _filesystem(store):
    from pipelines.storage import arrow_filesystem

    return arrow_filesystem(store.uri, store.resources)


if __name__ == "__main__":
    main()
