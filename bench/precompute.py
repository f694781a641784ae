"""Precompute throughput: the Ray Data stage versus a plain single-process loop doing the same
work on the same rows, plus stored bytes per sample (toy measured, SD3.5-Large by formula).

    python bench/precompute.py [--rows 8000] [--repeats 2]      # or: make bench-precompute
    -> bench/results/precompute.json

Same work: both read the same Parquet file of rendered shapes rows, check every row (decode,
size, caption, content hash), encode text and the VAE latents at the toy scales 8 10 12 16 with
the toy teacher, and write Parquet shards, the empty prompt and the manifest. Same threads: the
Ray path runs 2 encoder actors with 1 torch thread each on a 2-CPU local Ray instance; the loop
runs in one process with 2 torch threads. Ray's start-up (`ray.init`, ≈ 4 s, paid once per
cluster) is not in the stage time; its actor start-up and the two-pass reading are.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.common import median, write_result

THREADS = 2


def shapes_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from swd_core.toy.shapes import dataset

    images, captions = [], []
    for _, sample, image in dataset(11, rows):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(buf.getvalue())
        captions.append(sample.caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "caption": captions}), path, row_group_size=128)


def definition(storage: Path, source: Path, batch_size: int):
    from pipelines.schema import parse_pipeline_config

    return parse_pipeline_config({
        "name": "bench", "teacher": {"path": "builtin:toy-sd3", "max_sequence_length": 0},
        "data": {"sources": [{"path": str(source)}]},
        "precompute": {"actors": THREADS, "cpus_per_actor": 1, "batch_size": batch_size, "storage_dtype": "float16"},
        "distill": {"schedule": {"preset": "toy_4step"}}, "resources": {"storage": str(storage)},
    })


def plain_loop(cfg) -> int:
    """The stage's work without Ray, in this process: same functions, same outputs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from pipelines import sources, store
    from pipelines.stages import precompute as pc

    torch.set_num_threads(THREADS)
    uri, previous, _ = pc.prepare(cfg)
    spec = pc.EncodeSpec.from_config(cfg)
    tasks = sources.read_tasks(pc.all_sources(cfg), cfg.resources)
    checks = pa.concat_tables([pc.check_batch(b, spec) for b in sources.iter_batches(tasks, cfg.resources)])
    present = set(store.read_column(f"{uri}/{store.DATA}", "sample_id", cfg.resources))
    keep, quarantined, _, _ = pc.decide(checks, present)
    pc.write_quarantine(uri, quarantined, cfg.resources)
    text = pc.text_shapes(spec)
    store.save_empty_prompt(uri, text["prompt_embeds"], text["pooled"], spec.storage_dtype, cfg.resources)
    pc.write_manifest(uri, cfg, text, complete=False, rows=len(present), previous=previous)
    encoder = pc.Encoder(spec.__class__(**{**spec.__dict__, "threads": THREADS}), keep)
    out = Path(uri) / store.DATA
    out.mkdir(parents=True, exist_ok=True)
    pending, n = [], 0
    for batch in sources.iter_batches(tasks, cfg.resources):
        table = encoder(batch)  # one read task's rows, encoded `batch_size` at a time, as in the stage
        if table.num_rows:
            pending.append(table)
        if sum(t.num_rows for t in pending) >= 128:  # shards of about the size Ray writes
            pq.write_table(pa.concat_tables(pending), out / f"loop-{n:05d}.parquet")
            pending, n = [], n + 1
    if pending:
        pq.write_table(pa.concat_tables(pending), out / f"loop-{n:05d}.parquet")
    rows = store.count_rows(str(out), cfg.resources)
    pc.write_manifest(uri, cfg, text, complete=True, rows=rows, previous=previous)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import ray

    from pipelines import store
    from pipelines.stages import precompute

    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    source = work / "input" / "shapes.parquet"
    shapes_parquet(source, args.rows)
    start = time.perf_counter()
    ray.init(num_cpus=THREADS, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    ray_init_s = time.perf_counter() - start

    raw = {"ray_s": [], "loop_s": []}
    stored = {}  # rows each path stored (input rows minus quarantined duplicates): must agree
    toy_store = None
    for r in range(args.repeats):  # alternate, so both see the same background load on average
        for name in ("ray", "loop"):
            storage = work / f"{name}-{r}"
            cfg = definition(storage, source, args.batch_size)
            t0 = time.perf_counter()
            rows = precompute.run(cfg)["rows"] if name == "ray" else plain_loop(cfg)
            raw[f"{name}_s"].append(time.perf_counter() - t0)
            stored.setdefault(name, rows)
            assert len(set(stored.values())) == 1, f"the two paths stored different row counts: {stored}"
            print(f"{name} repeat {r}: {args.rows} rows in {raw[f'{name}_s'][-1]:.1f} s", flush=True)
            toy_store = store.store_uri(cfg)
    ray.shutdown()

    m = json.loads((Path(toy_store) / "manifest.json").read_text())
    files = list((Path(toy_store) / "data").glob("*.parquet"))
    on_disk = sum(f.stat().st_size for f in files) / stored["ray"]
    toy_raw = raw_tensor_bytes(m["text"]["prompt_embeds_shape"], m["text"]["pooled_shape"], m["latent_channels"],
                               m["scales"], 2)
    sd35 = raw_tensor_bytes([333, 4096], [2048], 16, [64, 80, 96, 128], 2)
    ray_rps, loop_rps = args.rows / median(raw["ray_s"]), args.rows / median(raw["loop_s"])
    path = write_result("precompute", {
        "ray_rows_per_s": round(ray_rps, 2), "loop_rows_per_s": round(loop_rps, 2),
        "ratio": round(ray_rps / loop_rps, 3),
        "bytes_per_sample_toy": round(on_disk, 1),
        "bytes_per_sample_toy_raw_tensors": toy_raw,
        "bytes_per_sample_sd35_large": sd35,
        "sd35_large_formula": "fp16 x (333*4096 prompt + 2048 pooled + 16*(64^2+80^2+96^2+128^2) latents); "
                              "raw tensor bytes, before Parquet compression; caption and id excluded",
        "rows": args.rows, "rows_stored": stored["ray"], "repeats": args.repeats, "batch_size": args.batch_size,
        "threads_each": THREADS,
        "ray_setup": f"{THREADS} actors x 1 CPU / 1 torch thread, local Ray with num_cpus={THREADS}",
        "loop_setup": f"1 process, {THREADS} torch threads", "ray_init_s": round(ray_init_s, 2),
        "raw_seconds": raw,
        "toy_shapes": {"prompt_embeds": m["text"]["prompt_embeds_shape"], "pooled": m["text"]["pooled_shape"],
                       "latent_channels": m["latent_channels"], "scales": m["scales"]},
    })
    print(json.dumps(json.loads(path.read_text()), indent=2))
    shutil.rmtree(work, ignore_errors=True)


def raw_tensor_bytes(prompt_shape, pooled_shape, channels, scales, itemsize) -> int:
    import math

    return itemsize * (math.prod(prompt_shape) + math.prod(pooled_shape) + sum(channels * s * s for s in scales))


if __name__ == "__main__":
    main()
