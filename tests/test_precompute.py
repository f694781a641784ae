"""End-to-end: the precompute stage on a real local Ray cluster, locally and on a moto S3 server."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipelines import storage, store
from pipelines.schema import parse_pipeline_config
from pipelines.stages import precompute
from pipelines.stages.precompute import load_rgb, sample_id, square_pixels

ROOT = Path(__file__).parents[1]
TOY = "builtin:toy-sd3"
pytestmark = pytest.mark.ray


def config(storage, sources, **over):
    data = {"name": "pc", "teacher": {"path": TOY, "max_sequence_length": 0},
            "data": {"sources": sources},
            "precompute": {"actors": 2, "batch_size": 8, "storage_dtype": "float16"},
            "distill": {"schedule": {"preset": "toy_4step"}}, "resources": {"storage": str(storage)}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return data


def shapes(limit, seed=0):
    return {"path": "builtin:shapes", "format": "shapes", "seed": seed, "limit": limit}


def png(im, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_parquet(path, images, captions):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.string())}), path)


def odd_images(n, seed=0):
    """Non-square RGB images larger than 64 px: exercise center crop and area downscaling."""
    rng = np.random.default_rng(seed)
    return [png(Image.fromarray(rng.integers(0, 256, (72 + 8 * i, 96, 3), dtype=np.uint8))) for i in range(n)]


@pytest.fixture(scope="module")
def adapter():
    from swd_core.adapters import load_adapter

    return load_adapter("sd3", TOY, max_sequence_length=0)


def direct(adapter, image: bytes, caption: str, scales, dtype=torch.float16) -> dict:
    """What the store must hold for one row, computed with the adapter directly."""
    from swd_core.scale_ops import downscale_pixels

    with torch.no_grad():
        text = adapter.encode_prompts([caption])
        px = square_pixels(load_rgb(image)[0])
        out = {"prompt_embeds": text.prompt_embeds[0], "pooled_prompt_embeds": text.pooled[0]}
        for s in scales:
            out[f"latents_{s}"] = adapter.encode_images(downscale_pixels(px, s * adapter.vae_scale_factor))[0]
    return {k: v.to(dtype).to(torch.float32) for k, v in out.items()}


def stored_rows(st: store.Store) -> dict:
    """sample_id -> decoded row, read through Ray Data and Store.decode."""
    rows = {}
    for batch in st.dataset().iter_batches(batch_format="numpy", batch_size=16):
        dec = st.decode(batch)
        for i, sid in enumerate(dec["sample_id"]):
            assert sid not in rows, f"sample {sid} stored twice"
            rows[sid] = {k: v[i] for k, v in dec.items()}
    return rows


def assert_matches(adapter, row, image, caption, scales):
    ref = direct(adapter, image, caption, scales)
    for k, v in ref.items():
        # fp16 storage of values computed in a different batch: equal up to one fp16 step
        torch.testing.assert_close(row[k], v, rtol=2e-3, atol=2e-3, msg=lambda m, k=k: f"{k}: {m}")


def test_local_store_values_resume_and_append(ray_cluster, tmp_path, adapter):
    from swd_core.toy.shapes import dataset

    images, captions = odd_images(3), ["a red circle", "a big blue square on the left", "a green cross"]
    write_parquet(tmp_path / "in" / "part-0.parquet", images, captions)
    sources = [shapes(12), {"path": str(tmp_path / "in"), "format": "parquet"}]
    cfg = parse_pipeline_config(config(tmp_path / "runs", sources))
    result = precompute.run(cfg)
    assert result["new_rows"] == 15 and result["quarantined_by_reason"] == {}

    st = store.open_store(cfg)
    m = st.manifest
    assert st.scales == [8, 10, 12, 16] and m["rows"] == 15 and m["complete"]
    assert m["latent_channels"] == 4 and m["vae"]["downsample"] == 4 and m["storage_dtype"] == "float16"
    rows = stored_rows(st)
    assert len(rows) == 15
    assert rows[sample_id(images[1], captions[1])]["latents_16"].shape == (4, 16, 16)
    assert rows[sample_id(images[1], captions[1])]["prompt_embeds"].shape == tuple(m["text"]["prompt_embeds_shape"])
    for image, caption in zip(images, captions):
        assert_matches(adapter, rows[sample_id(image, caption)], image, caption, st.scales)
    for _, sample, image in dataset(0, 3):  # the shapes source renders exactly these images
        b = png(image)
        assert_matches(adapter, rows[sample_id(b, sample.caption)], b, sample.caption, st.scales)

    # empty prompt beside the manifest; the Ray-free reader returns the same values
    empty = adapter.empty_prompt()
    pe, pooled = st.empty_prompt()
    torch.testing.assert_close(pe, empty.prompt_embeds.half().float())
    torch.testing.assert_close(pooled, empty.pooled.half().float())
    plain = {r["sample_id"]: r for r in store.read_rows(st.uri)}
    assert plain.keys() == rows.keys()
    # in file-name order the rows are in the sources' order (so training reads the same rows on every run)
    in_sources = [sample_id(png(image), sample.caption) for _, sample, image in dataset(0, 12)]
    assert list(plain) == in_sources + [sample_id(i, c) for i, c in zip(images, captions)]
    sid = sample_id(images[0], captions[0])
    np.testing.assert_array_equal(plain[sid]["latents_10"], rows[sid]["latents_10"].numpy())

    # rerun on the same input writes nothing; more input appends only the new rows
    files = sorted(os.listdir(tmp_path / "runs" / "pc" / "store" / "data"))
    again = precompute.run(cfg)
    assert again["new_rows"] == 0 and again["skipped_present"] == 15
    assert sorted(os.listdir(tmp_path / "runs" / "pc" / "store" / "data")) == files
    more = parse_pipeline_config(config(tmp_path / "runs", [shapes(20), sources[1]]))
    appended = precompute.run(more)
    assert appended["new_rows"] == 8 and appended["skipped_present"] == 15
    rows = stored_rows(store.open_store(more))
    assert len(rows) == 23 and store.open_store(more).manifest["rows"] == 23

    # a definition with other scales or another storage dtype is refused, saying what differs
    other = parse_pipeline_config(config(tmp_path / "runs", sources, distill={"schedule": {"preset": "toy_6step"}}))
    with pytest.raises(store.StoreMismatchError, match=r"scales: store has \[8, 10, 12, 16\], definition has \[4, 6, 8, 10, 12, 16\]"):
        store.open_store(other)
    with pytest.raises(store.StoreMismatchError, match="storage_dtype: store has 'float16', definition has 'bfloat16'"):
        precompute.run(parse_pipeline_config(config(tmp_path / "runs", sources, precompute={"storage_dtype": "bfloat16"})))


def bad_corpus(root: Path):
    """Good rows and every kind of bad input, as a Parquet file and an image folder.
    Returns {ref suffix: expected reason}, the good (image, caption) pairs and conversions."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = png(Image.fromarray(rgb))
    deep = (rng.integers(0, 65536, (64, 64), dtype=np.uint16))
    rows = [  # (image, caption, expected reason or None, expected conversion)
        (good, "a red circle", None, None),
        (png(Image.fromarray(rgb[..., 0])), "a green square", None, "L -> RGB"),
        (png(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA")), "a blue cross", None, "RGBA -> RGB on white"),
        (png(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "a yellow triangle", None, "CMYK -> RGB"),
        (png(Image.fromarray(deep)), "a purple circle", None, "I;16 (16-bit) -> RGB"),
        (good[:200], "a red square", "undecodable_image", None),  # truncated PNG
        (b"this is not an image", "a red cross", "undecodable_image", None),
        (png(Image.fromarray(rgb[:40, :40])), "a small red circle", "too_small", None),
        (png(Image.fromarray(rgb[:, ::-1])), "", "empty_caption", None),
        (png(Image.fromarray(rgb[::-1])), " ".join(["red circle"] * 15), "caption_too_long", None),
        (None, "a blue circle", "missing_image", None),
        (good, "a red circle", "duplicate", None),  # same bytes and caption as row 0
    ]
    write_parquet(root / "bad.parquet", [r[0] for r in rows], [r[1] for r in rows])
    folder = root / "folder"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png(Image.fromarray(rgb[::-1, ::-1])))
    (folder / "metadata.csv").write_text('file_name,caption\nok.png,"a circle, green"\ngone.png,a blue square\nok.png,"a circle, green"\n')
    expected = {f"bad.parquet#{i}": r[2] for i, r in enumerate(rows) if r[2]}
    expected["gone.png (metadata.csv line 3)"] = "missing_image"
    expected["ok.png (metadata.csv line 4)"] = "duplicate"
    goods = [(r[0], r[1]) for r in rows if r[2] is None] + [((folder / "ok.png").read_bytes(), "a circle, green")]
    conversions = [r[3] for r in rows if r[3]]
    return expected, goods, conversions


def test_bad_inputs_quarantined_with_reasons(ray_cluster, tmp_path, adapter):
    expected, goods, conversions = bad_corpus(tmp_path)
    sources = [{"path": str(tmp_path / "bad.parquet")}, {"path": str(tmp_path / "folder"), "format": "imagefolder"}]
    cfg = parse_pipeline_config(config(tmp_path / "runs", sources))
    result = precompute.run(cfg)
    assert result["new_rows"] == len(goods) == 6
    assert sorted(result["converted"]) == sorted(conversions)
    q = pq.read_table(tmp_path / "runs" / "pc" / "store" / "quarantine").to_pylist()
    got = {}
    for r in q:
        suffix = next(k for k in expected if r["ref"].endswith(k))
        got[suffix] = r["reason"]
        assert r["detail"]
    assert got == expected
    rows = stored_rows(store.open_store(cfg))
    assert set(rows) == {sample_id(b, c) for b, c in goods}
    for b, c in goods:
        assert_matches(adapter, rows[sample_id(b, c)], b, c, [8, 10, 12, 16])
    # a rerun records nothing twice
    again = precompute.run(cfg)
    assert again["new_rows"] == 0 and len(pq.read_table(tmp_path / "runs" / "pc" / "store" / "quarantine")) == len(q)


def test_kill_midway_then_rerun_stores_each_sample_once(ray_cluster, tmp_path):
    total = 480
    data = config(tmp_path / "runs", [shapes(total, seed=3)], precompute={"actors": 1, "batch_size": 4})
    path = tmp_path / "def.yaml"
    path.write_text(yaml.safe_dump(data))
    # A 127.0.0.1 address stays on loopback only with this flag (Ray otherwise swaps in the
    # machine's routable IP, where the fixture's cluster does not listen).
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen([sys.executable, "pipelines/distill.py", "--config", str(path), "--stages", "precompute"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    data_dir = tmp_path / "runs" / "pc" / "store" / "data"
    deadline = time.time() + 240
    try:
        while not (data_dir.exists() and any(data_dir.glob("*.parquet"))):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no shard written within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    cfg = parse_pipeline_config(data)
    with pytest.raises(store.StoreMismatchError, match="incomplete"):
        store.open_store(cfg)
    shards = sorted(data_dir.glob("*.parquet"))
    done_before = sum(pq.read_metadata(f).num_rows for f in shards if _readable(f))
    assert done_before < total, "the run finished before it was killed; nothing was tested"
    # what a kill during a write leaves behind: a truncated shard
    (data_dir / "killed-mid-write.parquet").write_bytes(shards[0].read_bytes()[:300])

    result = precompute.run(cfg)
    assert result["removed_partial_shards"] >= 1
    assert result["new_rows"] + result["skipped_present"] == total
    ids = pq.read_table(data_dir, columns=["sample_id"]).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == total
    assert store.open_store(cfg).manifest["rows"] == total


def _readable(f) -> bool:
    try:
        pq.read_metadata(f)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_synthesize_then_precompute_on_s3(ray_cluster, s3_server, adapter):
    import s3fs

    from swd_core.generate import generate_images

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    prompts = ["a red circle", "a blue square on the left", "a green triangle", "a yellow cross"]
    fs.pipe("swd-test/in/prompts.txt", ("\n".join(prompts) + "\n\n").encode())
    images = odd_images(2, seed=5)
    buf = io.BytesIO()
    pq.write_table(pa.table({"img": images, "text": ["a purple circle", "an orange square"]}), buf)
    fs.pipe("swd-test/in/extra/part.parquet", buf.getvalue())
    data = config("s3://swd-test/runs", [{"path": "s3://swd-test/in/extra", "image_column": "img", "caption_column": "text"}],
                  data={"prompts": "s3://swd-test/in/prompts.txt"},
                  synthesize={"enabled": True, "num_steps": 3, "guidance_scale": 4.5, "seed": 7, "batch_size": 3, "actors": 2},
                  resources={"storage": "s3://swd-test/runs", "s3": {"endpoint_url": s3_server}})
    cfg = parse_pipeline_config(data)
    from pipelines.stages import synthesize

    syn = synthesize.run(cfg)
    assert syn["sampled"] == 4 and syn["rows"] == 4
    table = pq.read_table("swd-test/runs/pc/synthesized", filesystem=storage.arrow_filesystem("s3://x", cfg.resources))
    made = {r["caption"]: r for r in table.to_pylist()}
    assert set(made) == set(prompts) and {r["seed"] for r in made.values()} == {7, 8, 9, 10}
    assert all(r["num_steps"] == 3 and r["guidance_scale"] == 4.5 and r["teacher"] == TOY for r in made.values())

    result = precompute.run(cfg)
    assert result["new_rows"] == 6 and result["store"] == "s3://swd-test/runs/pc/store"
    st = store.open_store(cfg)
    rows = stored_rows(st)
    assert len(rows) == 6
    for caption, r in made.items():
        assert_matches(adapter, rows[sample_id(r["image"], caption)], r["image"], caption, st.scales)
    for image, caption in zip(images, ["a purple circle", "an orange square"]):
        assert_matches(adapter, rows[sample_id(image, caption)], image, caption, st.scales)
    assert {r["sample_id"] for r in store.read_rows(st.uri, endpoint_url=s3_server)} == set(rows)

    # an image depends only on (prompt, seed): the first prompt alone, outside Ray, gives the same pixels
    alone = generate_images(adapter, [prompts[0]], [7], teacher_steps=3, guidance=4.5)[0]
    diff = np.abs(np.asarray(alone).astype(int) - np.asarray(Image.open(io.BytesIO(made[prompts[0]]["image"]))).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # at most one level from float noise across batch sizes
    assert synthesize.run(cfg)["sampled"] == 0


def test_null_text_columns_that_arrive_as_nan_quarantine_nothing():
    from pipelines.stages.precompute.quarantine import decide

    # a batch with no refused row: pandas hands its all-null text columns over as NaN floats
    checks = pa.table({"ref": ["a", "b", "c"], "order": [0, 1, 2], "sample_id": ["s1", "s2", "s1"],
                       "reason": [float("nan")] * 3, "detail": [float("nan")] * 3, "converted": [float("nan")] * 3})
    keep, quarantined, counts, converted = decide(checks, present=set())
    assert keep == {"a", "b"} and counts["new"] == 2 and not converted
    assert [(q["ref"], q["reason"]) for q in quarantined] == [("c", "duplicate")]


def test_a_folder_source_reads_nothing_outside_its_root(tmp_path):
    """Traversal, absolute and symlinked names are quarantined as outside_source without being
    opened: each target is a FIFO, and opening one for reading would block this test."""
    import threading

    from pipelines.schema import ResourcesConfig
    from pipelines.sources import read_task
    from pipelines.stages.precompute.checks import check_batch
    from pipelines.stages.precompute.spec import EncodeSpec

    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    for name in ("up.png", "abs.png", "linked.png"):
        os.mkfifo(outside / name)
    (root / "link.png").symlink_to(outside / "linked.png")
    (root / "good.png").write_bytes(png(Image.new("RGB", (64, 64), (200, 10, 10))))
    (root / "locked.png").write_bytes(b"x")
    os.chmod(root / "locked.png", 0)
    rows = [[2, "good.png", "a red square"], [3, "../outside/up.png", "x"], [4, str(outside / "abs.png"), "x"],
            [5, "link.png", "x"], [6, "good.png", 7], [7, "locked.png", "y"]]
    task = {"kind": "imagefolder", "task": 0, "folder": str(root), "rows": rows}
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("b", next(read_task(task, ResourcesConfig()))), daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "a file outside the source's folder was opened"
    batch = out["b"]
    spec = EncodeSpec("builtin:toy-sd3", "sd3", "float32", 0, (8, 16), 4, "float16")
    table = check_batch(batch, spec).to_pylist()
    reasons = [r["reason"] for r in table]
    assert reasons[:5] == [None, "outside_source", "outside_source", "outside_source", "caption_not_text"]
    # root reads a mode-000 file anyway (then its one byte is no image); anyone else may not
    assert reasons[5] == ("undecodable_image" if os.geteuid() == 0 else "unreadable")
    assert "resolves to" in table[3]["detail"] and "int" in table[4]["detail"]
