"""Input formats the data sources promise (pipelines/sources.py), read without Ray: Parquet prompt
files, Hugging Face `{bytes, path}` image columns, and image folders on S3."""

import io
import json
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.schema import DataSource, ResourcesConfig, parse_pipeline_config
from pipelines.sources import read_prompts, read_prompts_and_images, read_task, read_tasks
from pipelines.stages.precompute.checks import check_batch, sample_id
from pipelines.stages.precompute.spec import EncodeSpec

TOY = "builtin:toy-sd3"
SPEC = EncodeSpec(TOY, "sd3", "float32", 0, (8, 16), 4, "float16")  # images need >= 64 px


def png(color, side=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="PNG")
    return buf.getvalue()


def read_all(sources, resources=None) -> list[dict]:
    """Every row of `sources` as {ref, image, caption, missing}, through the stage's read tasks."""
    resources = resources or ResourcesConfig()
    batches = [b for t in read_tasks(sources, resources) for b in read_task(t, resources)]
    return [dict(zip(("ref", "order", "image", "caption", "missing"), row))
            for b in batches for row in zip(b["ref"], b["order"], b["image"], b["caption"], b["missing"])]


def checked(batch_rows) -> list[dict]:
    batch = {k: [r[k] for r in batch_rows] for k in ("ref", "order", "image", "caption", "missing")}
    return check_batch(batch, SPEC).to_pylist()


# ---------------------------------------------------------------- a. Parquet prompt files

def test_a_parquet_prompts_file_is_read_from_its_prompt_column_in_order(tmp_path):
    """`data.prompts` / `data.eval_prompts` take Parquet with a `prompt` column: only that column
    is read, in row order, stripped, blank and null prompts skipped."""
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"caption": ["not me", "nor me", "no", "x", "y"],
                             "prompt": ["  a red circle ", None, "   ", "a blue square", "a green cross\n"]}), path)
    assert read_prompts(str(path), ResourcesConfig()) == ["a red circle", "a blue square", "a green cross"]


def test_a_folder_of_parquet_prompt_files_is_read_file_by_file_in_name_order(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["b1", "b2"]}), folder / "b.parquet")
    pq.write_table(pa.table({"prompt": ["a1"]}), folder / "a.parquet")
    pq.write_table(pa.table({"nothing": ["hidden"]}), folder / "_temporary.parquet")  # skipped, as writers leave them
    assert read_prompts(str(folder), ResourcesConfig()) == ["a1", "b1", "b2"]


def test_a_parquet_prompts_file_without_a_prompt_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": ["a red circle"], "text": ["x"]}), path)
    with pytest.raises(ValueError) as err:
        read_prompts(str(path), ResourcesConfig())
    message = str(err.value)
    assert str(path) in message and "`prompt`" in message and "'caption'" in message and "'text'" in message


def test_the_evaluate_stage_reads_its_held_out_prompts_from_a_parquet_eval_prompts_file(tmp_path):
    """data.eval_prompts, the config field the evaluate stage reads (outside the shapes domain)."""
    from pipelines.stages.evaluate import eval_prompts

    path = tmp_path / "held_out.parquet"
    pq.write_table(pa.table({"prompt": ["p0", "p1", "", "p2"]}), path)
    cfg = parse_pipeline_config({"name": "ev", "teacher": {"path": TOY, "max_sequence_length": 0},
                                 "data": {"eval_prompts": str(path)}, "distill": {"schedule": {"preset": "toy_4step"}},
                                 "resources": {"storage": str(tmp_path / "runs")}})
    prompts, samples, source, notes = eval_prompts(cfg, "prompts", 2)
    assert prompts == ["p0", "p1"] and samples == [] and source == str(path) and notes == []
    prompts, _, _, notes = eval_prompts(cfg, "prompts", 5)
    assert prompts == ["p0", "p1", "p2"] and "has 3 prompts" in notes[0]


def test_a_parquet_prompts_file_with_an_image_column_gives_each_prompt_its_image(tmp_path):
    """The images fd_dinov2 compares with the prompts' own: bytes or a Hugging Face struct, kept
    beside their prompts when blank prompts are skipped; a text file or a prompt-only file has none."""
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"prompt": ["red", "", "blue"], "image": [png("red"), png("white"), png("blue")]}), path)
    prompts, images = read_prompts_and_images(str(path), ResourcesConfig())
    assert prompts == ["red", "blue"]
    assert [Image.open(io.BytesIO(b)).getpixel((0, 0)) for b in images] == [(255, 0, 0), (0, 0, 255)]
    write_hf_parquet(tmp_path / "hf.parquet", [{"bytes": png("red"), "path": None}], ["x"], caption_column="prompt")
    assert read_prompts_and_images(str(tmp_path / "hf.parquet"), ResourcesConfig())[1] == [png("red")]
    text = tmp_path / "p.txt"
    text.write_text("a\nb\n")
    assert read_prompts_and_images(str(text), ResourcesConfig()) == (["a", "b"], None)


def test_builtin_parti_is_partiprompts_with_its_licence_and_selectable_categories(tmp_path):
    from pipelines.prompt_sets import PARTI, parti_rows

    every = read_prompts("builtin:parti", ResourcesConfig())
    assert len(every) == 1632 == len(parti_rows())
    assert every[0] == "bond" and every[-1] == "a series of musical notes on a computer screen"
    assert any(p.startswith('"G I G G L E" painted') for p in every)  # quotation marks kept
    assert "Apache License" in (PARTI.parent / "LICENSE").read_text()
    assert "google-research/parti" in (PARTI.parent / "README.md").read_text()
    animals = read_prompts("builtin:parti?category=Animals", ResourcesConfig())
    assert len(animals) == 314 and set(animals) < set(every)
    two = read_prompts("builtin:parti?category=animals,food-beverage", ResourcesConfig())
    assert len(two) == 314 + 74
    basic_animals = read_prompts("builtin:parti?category=animals&challenge=Basic", ResourcesConfig())
    assert 0 < len(basic_animals) < 314
    assert set(basic_animals) == {r["prompt"] for r in parti_rows()
                                  if r["category"] == "Animals" and r["challenge"] == "Basic"}
    with pytest.raises(ValueError, match="unknown category.*'pets'.*animals"):
        read_prompts("builtin:parti?category=pets", ResourcesConfig())
    with pytest.raises(ValueError, match="unknown option"):
        read_prompts("builtin:parti?style=x", ResourcesConfig())
    base = {"name": "ev", "teacher": {"path": TOY, "max_sequence_length": 0},
            "distill": {"schedule": {"preset": "toy_4step"}}, "resources": {"storage": str(tmp_path)}}
    with pytest.raises(Exception, match="data.eval_prompts.*unknown built-in prompt set 'coco'"):
        parse_pipeline_config({**base, "data": {"eval_prompts": "builtin:coco"}})
    cfg = parse_pipeline_config({**base, "data": {"eval_prompts": "builtin:parti?category=vehicles"}})
    from pipelines.stages.evaluate import eval_prompts

    prompts, _, source, _ = eval_prompts(cfg, "prompts", 8)
    assert prompts == read_prompts("builtin:parti?category=vehicles", ResourcesConfig())[:8]
    assert source.startswith("builtin:parti")


# ---------------------------------------------------------------- b. Hugging Face image structs

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_hf_parquet(path, images, captions, image_column="image", caption_column="text"):
    """As `datasets` writes an `Image()` feature: a struct {bytes, path} per cell."""
    table = pa.table({image_column: pa.array(images, HF_IMAGE), caption_column: pa.array(captions, pa.string())})
    features = {image_column: {"_type": "Image"}, caption_column: {"dtype": "string", "_type": "Value"}}
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path)


def test_a_hugging_face_image_struct_column_is_decoded_and_a_row_without_bytes_is_quarantined(tmp_path):
    """Rows with bytes decode (`path` ignored); a row whose bytes are null (an image stored by
    path only) or whose whole cell is null is refused as missing_image, and the others go on."""
    red, blue = png((200, 10, 10)), png((10, 10, 200), side=80)
    path = tmp_path / "hf.parquet"
    write_hf_parquet(path, [{"bytes": red, "path": "red.png"}, {"bytes": None, "path": "/elsewhere/gone.png"},
                            {"bytes": blue, "path": None}, None],
                     ["a red square", "a lost image", "a blue square", "no cell at all"])
    rows = read_all([DataSource(path=str(path), image_column="image", caption_column="text")])
    assert [r["image"] for r in rows] == [red, None, blue, None]
    assert [r["caption"] for r in rows] == ["a red square", "a lost image", "a blue square", "no cell at all"]
    assert [r["ref"] for r in rows] == [f"{path}#{i}" for i in range(4)]
    table = checked(rows)
    assert [r["reason"] for r in table] == [None, "missing_image", None, "missing_image"]
    assert table[1]["detail"] == table[3]["detail"] == "no image bytes in the row"
    assert table[0]["sample_id"] == sample_id(red, "a red square")
    assert table[2]["sample_id"] == sample_id(blue, "a blue square")


def test_a_parquet_source_without_its_columns_is_refused_on_the_driver_in_one_line(tmp_path):
    """The driver reads every file's schema when it splits the source: a missing image or caption
    column is refused there, naming the file and the column, before any read task exists."""
    from pipelines.storage import InputError

    path = tmp_path / "hf.parquet"
    write_hf_parquet(path, [{"bytes": png((1, 2, 3)), "path": None}], ["x"], image_column="img")
    with pytest.raises(InputError, match=r"hf\.parquet: no column\(s\) \['image'\].*image_column") as err:
        read_tasks([DataSource(path=str(path), caption_column="text")], ResourcesConfig())
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"hf\.parquet: no column\(s\) \['caption'\]; it has \['img', 'text'\]"):
        read_tasks([DataSource(path=str(path), image_column="img")], ResourcesConfig())


# ---------------------------------------------------------------- c. image folders on S3

class Recording:
    """An fsspec filesystem that records every path it opens or reads."""

    def __init__(self, fs, seen):
        self._fs, self._seen = fs, seen

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name in ("open", "cat_file", "cat", "_open", "get", "get_file"):
            def recorded(path, *a, **k):
                self._seen.append(str(path))
                return attr(path, *a, **k)
            return recorded
        return attr


def test_an_s3_image_folder_reads_its_images_and_captions_and_nothing_outside_its_prefix(s3_server, monkeypatch):
    """metadata.csv on S3 names files under the folder's prefix; names that climb out (`..`, an
    absolute key, a URL) are refused as outside_source without being read, a missing key is
    missing_image, and a sibling prefix that starts with the same letters is never touched."""
    import s3fs

    from pipelines import sources

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    red, blue, secret = png((200, 10, 10)), png((10, 10, 200)), png((0, 0, 0))
    fs.pipe({"swd-test/fold/set/a.png": red, "swd-test/fold/set/sub/b.png": blue,
             "swd-test/fold/set-private/x.png": secret, "swd-test/fold/top.png": secret})
    fs.pipe("swd-test/fold/set/metadata.csv", (
        b"file_name,caption\n"
        b"a.png,a red square\n"
        b"sub/b.png,\"a blue square, below\"\n"
        b"../set-private/x.png,climbs out\n"
        b"/fold/top.png,absolute\n"
        b"s3://swd-test/fold/top.png,a url\n"
        b"sub/../../top.png,climbs out later\n"
        b"nothing.png,not there\n"))
    seen = []
    real_filesystem = sources.filesystem
    monkeypatch.setattr(sources, "filesystem", lambda uri, res: Recording(real_filesystem(uri, res), seen))
    resources = ResourcesConfig(s3={"endpoint_url": s3_server})

    rows = read_all([DataSource(path="s3://swd-test/fold/set/", format="imagefolder")], resources)
    read = [posixpath.normpath(p.removeprefix("s3://")) for p in seen]
    assert read and all(p.startswith("swd-test/fold/set/") for p in read), read
    assert [r["caption"] for r in rows] == ["a red square", "a blue square, below", "climbs out", "absolute", "a url",
                                            "climbs out later", "not there"]
    assert [r["image"] for r in rows] == [red, blue, None, None, None, None, None]
    assert rows[0]["ref"] == "s3://swd-test/fold/set/a.png (metadata.csv line 2)"
    assert all(r["missing"].startswith("outside_source: ") for r in rows[2:6])
    table = checked(rows)
    assert [r["reason"] for r in table] == [None, None] + ["outside_source"] * 4 + ["missing_image"]
    assert "leaves s3://swd-test/fold/set" in table[2]["detail"]


# ---------------------------------------------------------------- d. unusable files and folders

def test_a_metadata_csv_that_is_not_utf8_is_refused_naming_the_file_and_the_place(tmp_path):
    from pipelines.storage import InputError

    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "metadata.csv").write_bytes("file_name,caption\na.png,a caf\u00e9 sign\n".encode("latin-1"))
    with pytest.raises(InputError) as err:
        read_tasks([DataSource(path=str(folder), format="imagefolder")], ResourcesConfig())
    message = str(err.value)
    assert str(folder / "metadata.csv") in message and "not UTF-8" in message and "line 2" in message, message


def test_names_no_file_can_have_and_files_that_are_not_regular_are_refused_unopened(tmp_path):
    """A NUL byte or an over-long name is bad_path; a FIFO, a directory, a socket or a device
    named as an image is not_a_file, and is never opened (a FIFO would block the read forever).
    The other rows of the task are read as usual."""
    import os
    import socket
    import stat
    import threading

    root = tmp_path / "data"
    root.mkdir()
    (root / "good.png").write_bytes(png((200, 10, 10)))
    os.mkfifo(root / "pipe.png")
    (root / "folder.png").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.png"))
    try:
        os.mknod(root / "null.png", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        device = ["null.png"]
    except OSError:  # no CAP_MKNOD here: the other types still count
        device = []
    names = ["good.png", "bad\x00name.png", "x" * 5000 + ".png", "pipe.png", "folder.png", "sock.png", *device]
    task = {"kind": "imagefolder", "task": 0, "folder": str(root),
            "rows": [[i + 2, name, "a red square"] for i, name in enumerate(names)]}
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("b", next(read_task(task, ResourcesConfig()))),
                              daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():
        os.close(os.open(root / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail("reading the rows blocked: a FIFO was opened")
    sock.close()
    table = check_batch(out["b"], SPEC).to_pylist()
    reasons = [r["reason"] for r in table]
    assert reasons == [None, "bad_path", "bad_path"] + ["not_a_file"] * (3 + len(device)), table
    assert "NUL byte" in table[1]["detail"] and "too long (5004 characters)" in table[2]["detail"]
    assert [t["detail"].rsplit(" is ", 1)[1] for t in table[3:]] == (
        ["a FIFO (named pipe)", "a directory", "a socket"] + ["a character device"] * len(device))


def test_a_stalled_object_store_fails_the_read_within_its_timeout(tmp_path, stalled_endpoint):
    """An endpoint that accepts connections and never answers: each request gives up after
    `resources.s3.timeout_s` (5 tries in all), and the row is quarantined as unreadable."""
    import os
    import threading
    import time

    endpoint, held = stalled_endpoint
    resources = ResourcesConfig(s3={"endpoint_url": endpoint, "timeout_s": 0.2})
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # conftest sets them; standalone runs too
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    task = {"kind": "imagefolder", "task": 0, "folder": "s3://stalled/set", "rows": [[2, "a.png", "a red square"]]}
    out = {}
    start = time.monotonic()
    reader = threading.Thread(target=lambda: out.setdefault("b", next(read_task(task, resources))), daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "the read of a stalled endpoint did not end within 60 s"
    assert time.monotonic() - start < 20 and held, "no request reached the endpoint"
    (row,) = checked([dict(zip(("ref", "order", "image", "caption", "missing"), r)) for r in
                      zip(*(out["b"][k] for k in ("ref", "order", "image", "caption", "missing")))])
    assert row["reason"] == "unreadable" and "timeout" in row["detail"].lower(), row
