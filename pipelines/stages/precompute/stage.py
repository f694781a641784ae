"""The precompute stage's driver: its inputs, the store's manifest, and `run`, which checks every
row (pass 1), decides on the driver, and encodes the new rows (pass 2)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime

import pyarrow as pa

from pipelines import sources, store
from pipelines.logs import logger
from pipelines.schema import DataSource, PipelineConfig
from pipelines.stages.precompute.checks import CHECK_SCHEMA, check_batch
from pipelines.stages.precompute.encoder import Encoder, text_shapes
from pipelines.stages.precompute.quarantine import decide, write_quarantine
from pipelines.stages.precompute.spec import EncodeSpec
from pipelines.storage import arrow_filesystem, check_writable, fs_path, read_json, write_bytes

log = logger(__name__)


def all_sources(cfg: PipelineConfig) -> list[DataSource]:
    """The definition's sources, plus the synthesize stage's output when that stage is on."""
    out = list(cfg.data.sources)
    if cfg.synthesize.enabled:
        from pipelines.stages.synthesize import output_uri

        out.append(DataSource(path=output_uri(cfg), format="parquet"))
    if not out:
        raise ValueError("precompute: no input; add `data.sources` to the pipeline definition or enable `synthesize`")
    return out


def values_manifest(cfg: PipelineConfig, text: dict) -> dict:
    """The manifest fields that say what the stored values are (enough for `store.decode_numpy`):
    the definition's, plus the text embedding shapes from `text_shapes`."""
    manifest = store.expected_manifest(cfg)
    manifest["text"].update(prompt_embeds_shape=text["prompt_embeds_shape"], pooled_shape=text["pooled_shape"])
    return manifest


def write_manifest(uri: str, cfg: PipelineConfig, text: dict, complete: bool, rows: int,
                   previous: dict | None) -> dict:
    import json

    now = datetime.now(UTC).isoformat(timespec="seconds")
    manifest = values_manifest(cfg, text)
    manifest.update(rows=rows, empty_prompt=store.EMPTY_PROMPT, complete=complete,
                    created=(previous or {}).get("created", now), updated=now)
    write_bytes(f"{uri}/{store.MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode(), cfg.resources)
    return manifest


def prepare(cfg: PipelineConfig) -> tuple[str, dict | None, list[str]]:
    """Refuse a store made by another definition; drop partial shards of a killed run."""
    uri = store.store_uri(cfg)
    previous = read_json(f"{uri}/{store.MANIFEST}", cfg.resources)
    if previous is not None:
        diffs = store.manifest_differences(previous, store.expected_manifest(cfg))
        if diffs:
            raise store.StoreMismatchError(
                f"precompute: the store at {uri} was made by a different definition; refusing to mix rows:\n  - "
                + "\n  - ".join(diffs) + "\nset `precompute.output` to a new location, or delete the old store")
    removed = store.remove_unreadable(f"{uri}/{store.DATA}", cfg.resources)
    removed += store.remove_unreadable(f"{uri}/{store.QUARANTINE}", cfg.resources)
    return uri, previous, removed


def summary_line(result: dict) -> str:
    q = ", ".join(f"{k} {v}" for k, v in sorted(result["quarantined_by_reason"].items())) or "none"
    conv = sum(result["converted"].values())
    cap = result.get("captions", {})
    return (f"kept {result['new_rows']} new rows ({conv} converted; captions: "
            f"{cap.get('truncated', 0)} truncated to the text window, {cap.get('control_characters_removed', 0)} "
            f"with control characters removed), skipped {result['skipped_present']} "
            f"already present, quarantined {sum(result['quarantined_by_reason'].values())} ({q}); "
            f"store {result['store']} holds {result['rows']} rows ({result['seconds']:.1f} s)")


def run(cfg: PipelineConfig) -> dict:
    import ray

    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    pc, resources = cfg.precompute, cfg.resources
    # on the driver, before any Ray work: storage that cannot be written, an unusable source
    check_writable(store.store_uri(cfg), resources)
    tasks = sources.read_tasks(all_sources(cfg), resources)
    log.debug(f"{len(tasks)} read task(s) over {len(all_sources(cfg))} source(s); store {store.store_uri(cfg)}")
    ensure_ray(cfg)
    uri, previous, removed = prepare(cfg)
    if removed:
        log.info(f"removed {len(removed)} partial shard(s) of an interrupted run: {removed}")
    spec = EncodeSpec.from_config(cfg)

    # The empty prompt needs the text encoders: a task of its own, running while pass 1 checks.
    text_ref = ray.remote(num_cpus=pc.cpus_per_actor, num_gpus=pc.gpus_per_actor)(text_shapes).remote(spec)

    # Pass 1: check every row (Ray tasks), decide on the driver.
    # batch_size=None in both passes: one call per read task. A row count would make Ray Data bundle
    # the (one-row) read items of the fused read->map operator until it holds that many, i.e. all of
    # them into a single call on a single worker (measured: 1 task for 16 read tasks, no parallelism).
    checks = sources.ray_dataset(tasks, resources).map_batches(check_batch, fn_kwargs={"spec": spec}, batch_size=None)
    checks = pa.concat_tables([CHECK_SCHEMA.empty_table(),
                               *checks.iter_batches(batch_format="pyarrow", batch_size=None)])
    present = set(store.read_column(f"{uri}/{store.DATA}", "sample_id", resources))
    keep, quarantined, counts, converted = decide(checks, present)
    new_q = write_quarantine(uri, quarantined, resources)
    by_reason = Counter(r["reason"] for r in quarantined)
    check_s = time.perf_counter() - start
    log.info(f"checked {checks.num_rows} input rows in {check_s:.1f} s: {len(keep)} to encode, "
             f"{counts['skipped_present']} already in the store, "
             f"{len(quarantined)} quarantined ({new_q} newly recorded)")

    # Empty prompt + manifest first (complete: false until the data is written).
    text = ray.get(text_ref)
    store.save_empty_prompt(uri, text["prompt_embeds"], text["pooled"], pc.storage_dtype, resources)
    write_manifest(uri, cfg, text, complete=False, rows=len(present), previous=previous)

    # Pass 2: encode the new rows in an actor pool and append them to data/.
    if keep:
        keep_ref = ray.put(keep)
        # only the read tasks holding new rows: a resumed run does not reread what is done
        busy = {o >> sources.ORDER_SHIFT
                for r, o in zip(checks.column("ref").to_pylist(), checks.column("order").to_pylist())
                if r in keep}
        encoded = (sources.ray_dataset([t for t in tasks if t["task"] in busy], resources)
                   .map_batches(Encoder, fn_constructor_args=(spec, [keep_ref]), batch_size=None,
                                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=pc.actors),
                                num_cpus=pc.cpus_per_actor, num_gpus=pc.gpus_per_actor))
        # Blocks leave in the sources' order (the actors still encode in parallel), and the file
        # names follow it: a store made twice holds its rows in one order, which training reads.
        encoded.context.execution_options.preserve_order = True
        encoded.write_parquet(fs_path(f"{uri}/{store.DATA}"), filesystem=arrow_filesystem(uri, resources))
    rows = store.count_rows(f"{uri}/{store.DATA}", resources)
    manifest = write_manifest(uri, cfg, text, complete=True, rows=rows, previous=previous)
    result = {"store": uri, "rows": manifest["rows"], "new_rows": len(keep),
              "skipped_present": counts["skipped_present"],
              "quarantined_by_reason": dict(by_reason), "converted": dict(converted),
              "captions": {"truncated": counts["captions_truncated"],
                           "control_characters_removed": counts["control_characters_removed"]},
              "removed_partial_shards": len(removed), "check_seconds": check_s,
              "seconds": time.perf_counter() - start, "spec": asdict(spec), "device": text["device"]}
    log.info(summary_line(result))
    return result
