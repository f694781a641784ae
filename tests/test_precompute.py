"""End-to-end: the precompute stage on a real local Ray cluster, locally and on a moto S3 server."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
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
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.string())})
    pq.write_table(table, path)


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
    assert m["latent_channels"] == adapter.latent_channels and m["vae"]["downsample"] == 4
    assert m["storage_dtype"] == "float16"
    rows = stored_rows(st)
    assert len(rows) == 15
    assert rows[sample_id(images[1], captions[1])]["latents_16"].shape == (adapter.latent_channels, 16, 16)
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
    with pytest.raises(store.StoreMismatchError,
                       match=r"scales: store has \[8, 10, 12, 16\], definition has \[4, 6, 8, 10, 12, 16\]"):
        store.open_store(other)
    bf16 = parse_pipeline_config(config(tmp_path / "runs", sources, precompute={"storage_dtype": "bfloat16"}))
    with pytest.raises(store.StoreMismatchError,
                       match="storage_dtype: store has 'float16', definition has 'bfloat16'"):
        precompute.run(bf16)


# The acceptance test's precompute runs as its own driver joined to the shared cluster; under root
# its job's workers drop the two capabilities that let root read any file (CAP_DAC_OVERRIDE,
# CAP_DAC_READ_SEARCH), so a mode-000 file really fails with EACCES, as for any other user.
HOSTILE_DRIVER = """
import json, os, sys

def drop_file_override():
    import ctypes, os
    if os.geteuid() != 0:
        return
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & keep)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")

import ray
from pipelines.ray_runtime import worker_env
from pipelines.schema import load_pipeline_config
from pipelines.stages import precompute

ray.init(address=sys.argv[2], logging_level="WARNING",
         runtime_env={"env_vars": worker_env(), "worker_process_setup_hook": drop_file_override})
result = precompute.run(load_pipeline_config(sys.argv[1]))
print("RESULT " + json.dumps(result, default=str), flush=True)
"""


def hostile_corpus(tmp: Path) -> dict:
    """One image folder with every kind of hostile row, plus two small Parquet sources for what a
    metadata.csv cannot say (a caption that is a number, a row without image bytes). Returns the
    sources, the good rows {ref suffix: (image bytes, stored caption, conversion)}, the bad ones
    {ref suffix: reason}, and the FIFO sentinels (outside the root, and one inside it)."""
    rng = np.random.default_rng(7)
    root, outside = tmp / "corpus", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    rgb = lambda h=64, w=64: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    frames = [Image.fromarray(rgb()).quantize(32) for _ in range(2)]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    files = {  # name: (bytes, caption in metadata.csv)
        "good.png": (png(Image.fromarray(rgb())), "a red circle"),
        "wide.jpg": (png(Image.fromarray(rgb(72, 96)), "JPEG"), "a blue square, wide"),
        "grey.png": (png(Image.fromarray(rgb()[..., 0])), "a grey cross"),
        "rgba.png": (png(Image.fromarray(np.dstack([rgb(), rgb()[..., :1]]), "RGBA")), "a green triangle"),
        "cmyk.jpg": (png(Image.fromarray(rgb()).convert("CMYK"), "JPEG"), "a yellow circle"),
        "deep.png": (png(Image.fromarray(rng.integers(0, 65536, (64, 64), dtype=np.uint16))), "a purple square"),
        "palette.png": (png(Image.fromarray(rgb()).quantize(16)), "an orange cross"),
        "anim.gif": (anim.getvalue(), "a blinking circle"),
        "long.png": (png(Image.fromarray(rgb())), " ".join(["a red circle"] * 20)),  # over the window
        "nul.png": (png(Image.fromarray(rgb())), "a white\x00 square\x1b"),
        "truncated.png": (png(Image.fromarray(rgb()))[:200], "a red square"),
        "text.png": (b"this is not an image", "a red cross"),
        "tiny.png": (png(Image.fromarray(rgb(40, 40))), "a small circle"),
        "empty.png": (png(Image.fromarray(rgb())), ""),
        "locked.png": (png(Image.fromarray(rgb())), "a locked square"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    os.chmod(root / "locked.png", 0)  # a valid image: were it read, it would be kept, and the test fails
    sentinels = [outside / n for n in ("up.png", "abs.png", "linked.png")]
    for f in sentinels:
        os.mkfifo(f)
    (root / "link.png").symlink_to(outside / "linked.png")
    # named as images but not regular files: opening the FIFO would block the reader for good
    os.mkfifo(root / "pipe.png")
    sentinels.append(root / "pipe.png")
    (root / "folder.png").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))  # the socket file stays after close
    sock.close()
    nul = "bad\x00name.png"  # a name no file can have
    rows = [(n, c) for n, (_, c) in files.items()] + [
        ("good.png", "a red circle"),  # duplicate of the first row
        ("../outside/up.png", "x"), (str(outside / "abs.png"), "x"), ("link.png", "x"), ("gone.png", "a lost circle"),
        (nul, "a nul in the name"), ("pipe.png", "a pipe"), ("folder.png", "a folder"),
        ("sock.png", "a socket")]
    buf = io.StringIO()
    csv_writer = csv.writer(buf)
    csv_writer.writerow(["file_name", "caption"])
    csv_writer.writerows(rows)
    (root / "metadata.csv").write_text(buf.getvalue())
    line = {n: i + 2 for i, (n, _) in reversed(list(enumerate(rows)))}  # first line of each name
    ref = lambda n, i=None: f"{n} (metadata.csv line {i or line[n]})"  # noqa: E731

    pq.write_table(pa.table({"image": pa.array([files["good.png"][0]], pa.binary()),
                             "caption": pa.array([7], pa.int64())}),
                   tmp / "numbers.parquet")
    strict_long = png(Image.fromarray(rgb()))
    write_parquet(tmp / "strict.parquet", [strict_long, None], [" ".join(["a blue square"] * 20), "a blue circle"])
    sources = [{"path": str(root), "format": "imagefolder"}, {"path": str(tmp / "numbers.parquet")},
               {"path": str(tmp / "strict.parquet"), "long_captions": "quarantine"}]

    conversions = {"grey.png": "L -> RGB", "rgba.png": "RGBA -> RGB on white", "cmyk.jpg": "CMYK -> RGB",
                   "deep.png": "I;16 (16-bit) -> RGB", "palette.png": "P -> RGB", "anim.gif": "P -> RGB"}
    good = {ref(n): (files[n][0], files[n][1].replace("\x00", "").replace("\x1b", ""), conversions.get(n))
            for n in ("good.png", "wide.jpg", "grey.png", "rgba.png", "cmyk.jpg", "deep.png", "palette.png",
                      "anim.gif", "long.png", "nul.png")}
    bad = {ref("truncated.png"): "undecodable_image", ref("text.png"): "undecodable_image",
           ref("tiny.png"): "too_small", ref("empty.png"): "empty_caption", ref("locked.png"): "unreadable",
           ref("good.png", len(files) + 2): "duplicate", ref("../outside/up.png"): "outside_source",
           ref(str(outside / "abs.png")): "outside_source", ref("link.png"): "outside_source",
           ref("gone.png"): "missing_image", f"{nul!r} (metadata.csv line {line[nul]})": "bad_path",
           ref("pipe.png"): "not_a_file", ref("folder.png"): "not_a_file", ref("sock.png"): "not_a_file",
           "numbers.parquet#0": "caption_not_text",
           "strict.parquet#0": "caption_too_long", "strict.parquet#1": "missing_image"}
    return {"sources": sources, "good": good, "bad": bad, "sentinels": sentinels, "root": root}


def opened_sentinels(sentinels) -> list[str]:
    """FIFOs some process is blocked opening for reading (a writer's non-blocking open succeeds
    only then); opening them here also releases that reader with an empty read."""
    opened = []
    for f in sentinels:
        try:
            os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            opened.append(str(f))
        except OSError:  # ENXIO: no reader
            pass
    return opened


def test_hostile_corpus_every_row_stored_once_or_quarantined_with_its_reason(ray_cluster, tmp_path, adapter):
    """The acceptance test: the real precompute stage on the shared cluster, row by row."""
    corpus = hostile_corpus(tmp_path)
    data = config(tmp_path / "runs", corpus["sources"])
    path = tmp_path / "def.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "driver.py").write_text(HOSTILE_DRIVER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    try:
        proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(path), ray_cluster.address], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        opened = opened_sentinels(corpus["sentinels"])
        pytest.fail(f"precompute did not finish in 300 s; FIFOs being opened: {opened}\n"
                    f"{(err.stdout or b'')[-3000:]!r}")
    assert opened_sentinels(corpus["sentinels"]) == [], "a file outside the source's root, or a FIFO, was opened"
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "RESULT " in proc.stdout, out[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    good, bad = corpus["good"], corpus["bad"]
    print("\n".join(line for line in out.splitlines() if "[precompute]" in line))

    # every bad row in the quarantine once, with its reason and a detail
    q = pq.read_table(tmp_path / "runs" / "pc" / "store" / "quarantine").to_pylist()
    got = {}
    for r in q:
        suffix = next((k for k in bad if r["ref"].endswith(k)), None)
        assert suffix is not None and suffix not in got, f"unexpected quarantine row {r}"
        assert r["detail"], r
        got[suffix] = r["reason"]
    assert got == bad
    locked = next(r for r in q if r["ref"].endswith(next(k for k in bad if "locked" in k)))
    assert "Permission denied" in locked["detail"], locked  # EACCES from the kernel, not a stand-in

    # every good or convertible row in the store exactly once, with the values the teacher gives
    rows = stored_rows(store.open_store(parse_pipeline_config(data)))
    assert set(rows) == {sample_id(b, c) for b, c, _ in good.values()} and len(rows) == len(good)
    for b, c, _ in good.values():
        assert str(rows[sample_id(b, c)]["caption"]) == c.strip()
        assert_matches(adapter, rows[sample_id(b, c)], b, c, [8, 10, 12, 16])
    assert result["new_rows"] == len(good)
    assert result["quarantined_by_reason"] == dict(Counter(bad.values()))
    assert result["converted"] == dict(Counter(c for _, _, c in good.values() if c))
    assert result["captions"] == {"truncated": 1, "control_characters_removed": 1}
    assert "1 truncated to the text window, 1 with control characters removed" in out

    # a rerun (here, in this process) stores and records nothing twice
    cfg = parse_pipeline_config(data)
    os.chmod(corpus["root"] / "locked.png", 0o644)  # readable now: the one row a rerun adds
    again = precompute.run(cfg)
    assert again["new_rows"] == 1 and again["skipped_present"] == len(good)
    assert len(pq.read_table(tmp_path / "runs" / "pc" / "store" / "quarantine")) == len(q)
    assert opened_sentinels(corpus["sentinels"]) == []


def test_kill_midway_then_rerun_stores_each_sample_once(ray_cluster, tmp_path):
    total = 480
    data = config(tmp_path / "runs", [shapes(total, seed=3)], precompute={"actors": 1, "batch_size": 4})
    path = tmp_path / "def.yaml"
    path.write_text(yaml.safe_dump(data))
    # A 127.0.0.1 address stays on loopback only with this flag (Ray otherwise swaps in the
    # machine's routable IP, where the fixture's cluster does not listen).
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, PYTHONPATH=str(ROOT),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen([sys.executable, "pipelines/distill.py", "--config", str(path), "--stages", "precompute"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
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
    data = config("s3://swd-test/runs",
                  [{"path": "s3://swd-test/in/extra", "image_column": "img", "caption_column": "text"}],
                  data={"prompts": "s3://swd-test/in/prompts.txt"},
                  synthesize={"enabled": True, "num_steps": 3, "guidance_scale": 4.5, "seed": 7, "batch_size": 3,
                              "actors": 2},
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
    in_ray = np.asarray(Image.open(io.BytesIO(made[prompts[0]]["image"])))
    diff = np.abs(np.asarray(alone).astype(int) - in_ray.astype(int))
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
    reader = threading.Thread(target=lambda: out.setdefault("b", next(read_task(task, ResourcesConfig()))),
                              daemon=True)
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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_that_cannot_be_written_is_refused_before_any_input_is_read(tmp_path, where, request):
    """The source's metadata.csv does not exist: reading the input first would fail on that.
    The refusal names the store instead, so nothing was read and no Ray work was started."""
    from pipelines.storage import InputError

    (tmp_path / "in").mkdir()
    if where == "local":
        (tmp_path / "taken").write_text("a file where the storage folder should be")
        storage, resources = str(tmp_path / "taken" / "runs"), {}
    else:  # a bucket that does not exist on a real S3 endpoint
        endpoint = request.getfixturevalue("s3_server")
        storage, resources = "s3://no-such-bucket/runs", {"s3": {"endpoint_url": endpoint}}
    data = config(storage, [{"path": str(tmp_path / "in"), "format": "imagefolder"}], resources=resources)
    with pytest.raises(InputError, match=rf"cannot write to {storage}/pc/store: \w+"):
        precompute.run(parse_pipeline_config(data))
