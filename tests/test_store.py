"""The store's format and checks without Ray: tensor bytes, manifest comparison, image intake."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import store
from pipelines.schema import parse_pipeline_config
from pipelines.stages.precompute import (
    EncodeSpec,
    Refused,
    check_row,
    clean_caption,
    load_rgb,
    sample_id,
)
from pipelines.store import codec
from tests.conftest import TINY


def _cfg(tmp_path, **over):
    data = {"name": "t", "teacher": {"path": TINY, "max_sequence_length": 0},
            "distill": {"schedule": {"preset": "toy_4step"}}, "resources": {"storage": str(tmp_path)}}
    data.update(over)
    return parse_pipeline_config(data)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_tensor_bytes_round_trip(dtype):
    t = torch.randn(3, 4, 5)
    raw = [store.encode_tensor(x, dtype) for x in t]
    assert all(len(b) == 4 * 5 * store.DTYPE_BYTES[dtype] for b in raw)
    back = codec._decode_column(raw, dtype, (4, 5))
    from swd_core.adapters.sd3 import torch_dtype

    expect = t.to(torch_dtype(dtype)).to(torch.float32).numpy()
    np.testing.assert_array_equal(back, expect)
    assert back.dtype == np.float32


def test_sample_id_is_content_hash():
    a = sample_id(b"png-bytes", "a red circle")
    assert a == sample_id(b"png-bytes", "a red circle")
    assert a != sample_id(b"png-bytes", "a red circle ")
    assert a != sample_id(b"png-byte", "sa red circle")  # length-prefixed parts


def test_manifest_differences_name_each_field(tmp_path):
    expected = store.expected_manifest(_cfg(tmp_path))
    assert store.manifest_differences(expected, expected) == []
    other = store.expected_manifest(_cfg(tmp_path, distill={"schedule": {"preset": "toy_6step"}},
                                         precompute={"storage_dtype": "bfloat16"}))
    diffs = store.manifest_differences(other, expected)
    assert "scales: store has [4, 6, 8, 10, 12, 16], definition has [8, 10, 12, 16]" in diffs
    assert "storage_dtype: store has 'bfloat16', definition has 'float16'" in diffs
    assert len(diffs) == 2


def test_teacher_content_hash_tells_models_apart():
    assert store.teacher_content_hash(TINY) == store.teacher_content_hash(TINY)
    assert store.teacher_content_hash(TINY) != store.teacher_content_hash("builtin:tiny-sd3?layers=2")
    assert store.teacher_content_hash(TINY) != store.teacher_content_hash("builtin:toy-sd3")


def test_open_store_without_a_store_says_what_to_run(tmp_path):
    with pytest.raises(store.StoreMismatchError, match="run the precompute stage"):
        store.open_store(_cfg(tmp_path))
    with pytest.raises(store.StoreMismatchError, match="run the precompute stage"):
        list(store.read_rows(str(tmp_path / "nowhere")))


def _png(im: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_load_rgb_converts_modes():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out, note = load_rgb(_png(Image.fromarray(rgb)))
    assert note is None and np.array_equal(out, rgb)
    grey, note = load_rgb(_png(Image.fromarray(rgb[..., 0])))
    assert note == "L -> RGB" and np.array_equal(grey[..., 1], rgb[..., 0])
    # 16-bit: 65535 must become 255, not clip at 255 from 65535 raw
    deep = np.full((8, 8), 65535, dtype=np.uint16)
    deep[0, 0] = 257 * 10
    out, note = load_rgb(_png(Image.fromarray(deep)))
    assert "16-bit" in note and out[1, 1, 0] == 255 and out[0, 0, 0] == 10
    # transparent pixels composite on white
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    out, note = load_rgb(_png(Image.fromarray(rgba, "RGBA")))
    assert note.startswith("RGBA") and (out == 255).all()
    out, note = load_rgb(_png(Image.fromarray(rgb).convert("CMYK"), "JPEG"))
    assert note == "CMYK -> RGB" and out.shape == (8, 8, 3)


def test_check_row_reasons(tmp_path):
    spec = EncodeSpec.from_config(_cfg(tmp_path))
    good = _png(Image.new("RGB", (64, 64), (10, 20, 30)))
    assert check_row(good, "a red circle", None, spec) is None
    cases = {
        "missing_image": (None, "a red circle"),
        "undecodable_image": (good[: len(good) // 2], "a red circle"),
        "too_small": (_png(Image.new("RGB", (48, 64))), "a red circle"),
        "empty_caption": (good, "   "),
        "caption_too_long": (good, " ".join(["red"] * 40)),
    }
    for reason, (image, caption) in cases.items():
        with pytest.raises(Refused) as err:
            check_row(image, caption, None, spec, long_captions="quarantine")
        assert err.value.reason == reason, (reason, err.value)
    # by default an over-long caption is kept (the encoders see its first tokens) and noted
    notes = {}
    assert check_row(good, " ".join(["red"] * 40), None, spec, notes=notes) is None and notes["truncated"]
    # control characters are removed and counted; a caption of nothing else is empty
    notes = {}
    assert check_row(good, "a red\x00 circle\x1b\x7f\n", None, spec, notes=notes) is None
    assert notes == {"control_characters": 3}
    with pytest.raises(Refused, match="without its control characters"):
        check_row(good, "\x00\x07 ", None, spec)
    assert clean_caption("a\tred\x00 circle\x9b") == ("a\tred circle", 2)
    with pytest.raises(ValueError, match="long_captions must be one of"):
        check_row(good, "a red circle", None, spec, long_captions="drop")


def test_full_resolution_store_holds_its_one_scale_once():
    """A full-resolution schedule repeats one scale; its store has one column for it (a duplicate
    column once failed every encoder actor)."""
    from pipelines.schema import parse_pipeline_config
    from pipelines.stages.precompute import EncodeSpec, data_schema

    cfg = parse_pipeline_config({"name": "fr", "teacher": {"path": "builtin:tiny-sd3"},
                                 "distill": {"schedule": {"preset": "toy_4step", "scalewise": False}}})
    assert list(cfg.schedule().scales) == [16, 16, 16, 16]
    assert store.stored_scales(cfg) == [16] and EncodeSpec.from_config(cfg).scales == (16,)
    assert data_schema(EncodeSpec.from_config(cfg).scales).names.count("latents_16") == 1


def test_local_copy_of_an_s3_export_follows_a_new_export_at_the_same_uri(tmp_path, s3_server):
    from pipelines.schema import ResourcesConfig
    from pipelines.storage import local_copy, upload_dir

    resources = ResourcesConfig(s3={"endpoint_url": s3_server})
    uri, cache = "s3://swd-test/copies/student", str(tmp_path / "cache")
    export = tmp_path / "export"
    export.mkdir()
    (export / "weights.txt").write_text("first")
    upload_dir(export, uri, resources)
    first = local_copy(uri, resources, cache)
    assert (first / "weights.txt").read_text() == "first"
    assert local_copy(uri, resources, cache) == first  # unchanged: served from the cache
    (export / "weights.txt").write_text("second")  # same size: the ETag tells them apart
    upload_dir(export, uri, resources)
    second = local_copy(uri, resources, cache)
    assert second != first and (second / "weights.txt").read_text() == "second"
    assert not local_copy("s3://swd-test/copies/nothing-here", resources, cache).exists()


def test_file_rows_of_an_s3_store_come_in_listing_order_with_each_files_count(tmp_path, s3_server):
    import pyarrow as pa

    from pipelines.schema import ResourcesConfig
    from pipelines.storage import filesystem

    resources = ResourcesConfig(s3={"endpoint_url": s3_server})
    uri = "s3://swd-test/file-rows"
    fs = filesystem(uri, resources)
    # more files than readers
    counts = {f"part-{i:03d}.parquet": (7 * i) % 11 for i in range(3 * store.FOOTER_READERS)}
    for name, n in counts.items():
        with fs.open(f"swd-test/file-rows/{name}", "wb") as f:
            pq.write_table(pa.table({"x": list(range(n))}), f)
    fs.touch("swd-test/file-rows/_temporary.parquet")  # skipped like every listing of the store

    rows = store.file_rows(uri, resources)
    assert [(path.rsplit("/", 1)[1], n) for path, n in rows] == sorted(counts.items())
    assert store.count_rows(uri, resources) == sum(counts.values())
