"""Precompute stage (Ray Data): (image, caption) rows -> text embeddings and VAE latents at every
scale of the schedule -> the store (pipelines/store/).

Two passes over the input, both streamed:
1. check (Ray tasks, cheap): decode each image, test size and caption, hash it into `sample_id`.
   The driver then decides each row: refused (-> quarantine with the reason), a duplicate of an
   earlier row (-> quarantine), already in the store (skipped: reruns and resumes), or new.
2. encode (an actor pool holding the text encoders and the VAE, never the transformer): the new
   rows -> `data/*.parquet`, appended.
Reading twice costs a second decode of each image, far less than holding every image in the
object store between the passes at real scale.

A run killed midway leaves complete shards (their rows count as done) and perhaps one partial
shard, which the next run deletes; the manifest says `complete: false` until a run finishes.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipelines import sources, store
from pipelines.schema import DataSource, PipelineConfig, ResourcesConfig
from pipelines.storage import arrow_filesystem, fs_path, read_json, write_bytes

# Why a row is refused (the quarantine's `reason` column).
REASONS = ("missing_image", "undecodable_image", "too_small", "empty_caption", "caption_too_long", "duplicate")
QUARANTINE_SCHEMA = pa.schema([("quarantine_id", pa.string()), ("ref", pa.string()), ("sample_id", pa.string()),
                               ("reason", pa.string()), ("detail", pa.string()), ("time", pa.string())])


class Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def sample_id(image: bytes | None, caption: str | None) -> str:
    """Stable content hash of (image bytes, caption); length-prefixed so the parts cannot blur."""
    h = hashlib.sha256()
    for part in (image or b"", (caption or "").encode("utf-8")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def load_rgb(data: bytes) -> tuple[np.ndarray, str | None]:
    """Image bytes -> uint8 RGB (H, W, 3) and what was converted (None when it was plain RGB).

    Greyscale, palette, CMYK become RGB; transparency is composited on white (what a viewer
    shows); 16-bit images are scaled to 8 bits rather than clipped."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # decode now: truncated files fail here, not later
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt input
        raise Refused("undecodable_image", f"{type(err).__name__}: {err}") from None
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im), None
    if mode.startswith("I"):  # 16/32-bit integer greyscale
        arr = np.asarray(im).astype(np.float64)
        arr = arr / 257.0 if (mode.startswith("I;16") or arr.max() > 255) else arr
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), f"{mode} (16-bit) -> RGB"
    if mode == "F":
        grey = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), "F -> RGB"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), f"{mode} -> RGB on white"
    return np.asarray(im.convert("RGB")), f"{mode} -> RGB"


@dataclass(frozen=True)
class EncodeSpec:
    """What both passes need to know; plain values so it pickles to every Ray worker."""

    teacher: str
    family: str
    dtype: str
    max_sequence_length: int
    scales: tuple[int, ...]
    downsample: int
    storage_dtype: str
    threads: int = 1
    batch_size: int = 32  # rows per text-encoder / VAE call

    @property
    def min_side(self) -> int:
        return max(self.scales) * self.downsample

    @staticmethod
    def from_config(cfg: PipelineConfig) -> EncodeSpec:
        return EncodeSpec(cfg.teacher.path, cfg.teacher.family, cfg.teacher.dtype, cfg.teacher.max_sequence_length,
                          tuple(store.stored_scales(cfg)), store.vae_settings(cfg.teacher.path)["downsample"],
                          cfg.precompute.storage_dtype, max(1, int(cfg.precompute.cpus_per_actor)),
                          cfg.precompute.batch_size)


@lru_cache(maxsize=4)
def caption_limit(teacher: str, max_sequence_length: int):
    """(tokenizer, token limit) deciding an over-long caption: the longest window any text
    encoder sees — T5's `max_sequence_length` when the teacher has T5, else CLIP's."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from swd_core.tiny_models import resolve_pretrained

    path = resolve_pretrained(teacher)
    index = Path(path) / "model_index.json"
    has_t5 = index.exists() and (json.loads(index.read_text()).get("tokenizer_3") or [None])[0] is not None
    if has_t5 and max_sequence_length > 0:
        tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3")
        return tok, max_sequence_length
    tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    return tok, int(tok.model_max_length)


def check_row(image: bytes | None, caption: str | None, missing: str | None, spec: EncodeSpec) -> str | None:
    """Raise `Refused` for a row that cannot be used; return the conversion note otherwise."""
    if image is None:
        raise Refused("missing_image", missing or "no image")
    if caption is None or not caption.strip():
        raise Refused("empty_caption", "the caption is empty")
    tok, limit = caption_limit(spec.teacher, spec.max_sequence_length)
    n = len(tok(caption.strip())["input_ids"])
    if n > limit:
        raise Refused("caption_too_long", f"{n} tokens, the text encoder sees {limit}")
    rgb, converted = load_rgb(image)
    h, w = rgb.shape[:2]
    if min(h, w) < spec.min_side:
        raise Refused("too_small", f"{w}x{h} px; the largest scale {max(spec.scales)} needs "
                                   f"{spec.min_side}x{spec.min_side} (scale x VAE factor {spec.downsample})")
    return converted


CHECK_SCHEMA = pa.schema([("ref", pa.string()), ("order", pa.int64()), ("sample_id", pa.string()),
                          ("reason", pa.string()), ("detail", pa.string()), ("converted", pa.string())])


def check_batch(batch: dict, spec: EncodeSpec) -> pa.Table:
    """Pass 1 on a column batch: sample_id, reason/detail (None when usable), conversion note."""
    out = {"ref": [], "order": [], "sample_id": [], "reason": [], "detail": [], "converted": []}
    for ref, order, image, caption, missing in zip(batch["ref"], batch["order"], batch["image"], batch["caption"], batch["missing"]):
        reason = detail = converted = None
        try:
            converted = check_row(image, caption, missing, spec)
        except Refused as err:
            reason, detail = err.reason, err.detail
        out["ref"].append(ref)
        out["order"].append(int(order))
        out["sample_id"].append(sample_id(image, caption))
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["converted"].append(converted)
    return pa.table(out, schema=CHECK_SCHEMA)


def square_pixels(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> center-cropped square float (1, 3, S, S) in [-1, 1]."""
    from swd_core.toy.shapes import from_uint8

    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.array(rgb[top:top + side, left:left + side])  # a writable copy for torch
    return from_uint8(torch.from_numpy(crop).permute(2, 0, 1)[None])


def data_schema(scales) -> pa.Schema:
    return pa.schema([("sample_id", pa.string()), ("caption", pa.string()), ("prompt_embeds", pa.binary()),
                      ("pooled_prompt_embeds", pa.binary())] + [(store.latent_column(s), pa.binary()) for s in scales])


class Encoder:
    """Pass 2, one per actor: rows -> store rows. Holds the text encoders and the VAE only.

    `keep` is the set of refs to encode (wrapped in a list so Ray passes the ObjectRef through
    to `ray.get` here rather than copying the set into every actor's arguments)."""

    def __init__(self, spec: EncodeSpec, keep=None):
        from swd_core.adapters import load_adapter

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.adapter = load_adapter(spec.family, spec.teacher, dtype=spec.dtype,
                                    max_sequence_length=spec.max_sequence_length, load_transformer=False)
        if keep is not None and not isinstance(keep, (set, frozenset)):
            import ray

            keep = ray.get(keep[0])
        self.keep = keep
        self.schema = data_schema(spec.scales)

    @torch.no_grad()
    def encode(self, images: list[bytes], captions: list[str]) -> dict:
        """The store row values for usable (image, caption) pairs (already checked)."""
        from swd_core.scale_ops import downscale_pixels

        spec, dt = self.spec, self.spec.storage_dtype
        pixels = [square_pixels(load_rgb(b)[0]) for b in images]
        text = self.adapter.encode_prompts([c.strip() for c in captions])
        cols = {"sample_id": [sample_id(b, c) for b, c in zip(images, captions)], "caption": [c.strip() for c in captions],
                "prompt_embeds": [store.encode_tensor(t, dt) for t in text.prompt_embeds],
                "pooled_prompt_embeds": [store.encode_tensor(t, dt) for t in text.pooled]}
        for s in spec.scales:
            batch = torch.cat([downscale_pixels(p, s * spec.downsample) for p in pixels])
            latents = self.adapter.encode_images(batch)
            cols[store.latent_column(s)] = [store.encode_tensor(z, dt) for z in latents]
        return cols

    def __call__(self, batch: dict) -> pa.Table:
        rows = [(b, c) for r, b, c in zip(batch["ref"], batch["image"], batch["caption"])
                if self.keep is None or r in self.keep]
        if not rows:
            return self.schema.empty_table()
        images, captions = zip(*rows)
        # One call gets a whole read task's rows (see `run`); the models see `batch_size` at a time.
        step = self.spec.batch_size
        return pa.concat_tables([pa.table(self.encode(list(images[i:i + step]), list(captions[i:i + step])),
                                          schema=self.schema) for i in range(0, len(images), step)])


def text_shapes(spec: EncodeSpec) -> dict:
    """Empty-prompt embeddings (computed once, beside the manifest) and the text shapes."""
    from swd_core.adapters import load_adapter

    adapter = load_adapter(spec.family, spec.teacher, dtype=spec.dtype,
                           max_sequence_length=spec.max_sequence_length, load_transformer=False)
    empty = adapter.empty_prompt()
    return {"prompt_embeds": empty.prompt_embeds, "pooled": empty.pooled,
            "prompt_embeds_shape": list(empty.prompt_embeds.shape[1:]), "pooled_shape": list(empty.pooled.shape[1:])}


def all_sources(cfg: PipelineConfig) -> list[DataSource]:
    """The definition's sources, plus the synthesize stage's output when that stage is on."""
    out = list(cfg.data.sources)
    if cfg.synthesize.enabled:
        from pipelines.stages.synthesize import output_uri

        out.append(DataSource(path=output_uri(cfg), format="parquet"))
    if not out:
        raise ValueError("precompute: no input; add `data.sources` to the pipeline definition or enable `synthesize`")
    return out


def quarantine_id(ref: str, sid: str, reason: str) -> str:
    return hashlib.sha256(f"{ref}\0{sid}\0{reason}".encode()).hexdigest()[:32]


def decide(checks: pa.Table, present: set[str]) -> tuple[set[str], list[dict], Counter, Counter]:
    """Driver side, in input order: keep / quarantine / skip each checked row.
    Returns (refs to encode, quarantine rows, counts, conversions of kept rows)."""
    checks = checks.sort_by("order")
    keep, quarantined, counts, converted = set(), [], Counter(), Counter()
    first: dict[str, str] = {}
    for row in checks.to_pylist():
        sid, ref = row["sample_id"], row["ref"]
        if row["reason"]:
            quarantined.append({"ref": ref, "sample_id": sid, "reason": row["reason"], "detail": row["detail"]})
            continue
        if sid in first:  # decided before "present", so reruns quarantine the same rows
            quarantined.append({"ref": ref, "sample_id": sid, "reason": "duplicate",
                                "detail": f"same image and caption as {first[sid]}"})
            continue
        first[sid] = ref
        if sid in present:
            counts["skipped_present"] += 1
            continue
        keep.add(ref)
        if row["converted"]:
            converted[row["converted"]] += 1
    counts["new"] = len(keep)
    return keep, quarantined, counts, converted


def write_quarantine(uri: str, rows: list[dict], resources: ResourcesConfig) -> int:
    """Append quarantine rows not recorded by an earlier run; returns how many were new."""
    import pyarrow.parquet as pq

    known = set(store.read_column(f"{uri}/{store.QUARANTINE}", "quarantine_id", resources))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    new = []
    for r in rows:
        qid = quarantine_id(r["ref"], r["sample_id"], r["reason"])
        if qid not in known:
            known.add(qid)
            new.append({"quarantine_id": qid, **r, "time": now})
    if new:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(new, schema=QUARANTINE_SCHEMA), buf)
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.parquet"
        write_bytes(f"{uri}/{store.QUARANTINE}/{name}", buf.getvalue().to_pybytes(), resources)
    return len(new)


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
    return (f"[precompute] kept {result['new_rows']} new rows ({conv} converted), skipped {result['skipped_present']} "
            f"already present, quarantined {sum(result['quarantined_by_reason'].values())} ({q}); "
            f"store {result['store']} holds {result['rows']} rows ({result['seconds']:.1f} s)")


def run(cfg: PipelineConfig) -> dict:
    import ray

    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    ensure_ray(cfg)
    uri, previous, removed = prepare(cfg)
    if removed:
        print(f"[precompute] removed {len(removed)} partial shard(s) of an interrupted run: {removed}", flush=True)
    spec = EncodeSpec.from_config(cfg)
    pc, resources = cfg.precompute, cfg.resources
    tasks = sources.read_tasks(all_sources(cfg), resources)

    # The empty prompt needs the text encoders: a task of its own, running while pass 1 checks.
    text_ref = ray.remote(num_cpus=pc.cpus_per_actor, num_gpus=pc.gpus_per_actor)(text_shapes).remote(spec)

    # Pass 1: check every row (Ray tasks), decide on the driver.
    # batch_size=None in both passes: one call per read task. A row count would make Ray Data bundle
    # the (one-row) read items of the fused read->map operator until it holds that many, i.e. all of
    # them into a single call on a single worker (measured: 1 task for 16 read tasks, no parallelism).
    checks = sources.ray_dataset(tasks, resources).map_batches(check_batch, fn_kwargs={"spec": spec}, batch_size=None)
    checks = pa.concat_tables([CHECK_SCHEMA.empty_table(), *checks.iter_batches(batch_format="pyarrow", batch_size=None)])
    present = set(store.read_column(f"{uri}/{store.DATA}", "sample_id", resources))
    keep, quarantined, counts, converted = decide(checks, present)
    new_q = write_quarantine(uri, quarantined, resources)
    by_reason = Counter(r["reason"] for r in quarantined)
    check_s = time.perf_counter() - start
    print(f"[precompute] checked {checks.num_rows} input rows in {check_s:.1f} s: {len(keep)} to encode, "
          f"{counts['skipped_present']} already in the store, {len(quarantined)} quarantined ({new_q} newly recorded)",
          flush=True)

    # Empty prompt + manifest first (complete: false until the data is written).
    text = ray.get(text_ref)
    store.save_empty_prompt(uri, text["prompt_embeds"], text["pooled"], pc.storage_dtype, resources)
    write_manifest(uri, cfg, text, complete=False, rows=len(present), previous=previous)

    # Pass 2: encode the new rows in an actor pool and append them to data/.
    if keep:
        keep_ref = ray.put(keep)
        # only the read tasks holding new rows: a resumed run does not reread what is done
        busy = {o >> sources.ORDER_SHIFT for r, o in zip(checks.column("ref").to_pylist(), checks.column("order").to_pylist())
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
    result = {"store": uri, "rows": manifest["rows"], "new_rows": len(keep), "skipped_present": counts["skipped_present"],
              "quarantined_by_reason": dict(by_reason), "converted": dict(converted),
              "removed_partial_shards": len(removed), "check_seconds": check_s,
              "seconds": time.perf_counter() - start, "spec": asdict(spec)}
    print(summary_line(result), flush=True)
    return result
