"""Inputs of the precompute and synthesize stages, as Ray-free read tasks.

A source is split on the driver into small JSON-able *read tasks* (a Parquet file, a chunk of a
`metadata.csv`, a range of shapes rows); `read_task` turns one into column batches
`{ref, order, image, caption, missing, long_captions}`. Ray Data runs the tasks in parallel (`from_items` +
`map_batches`); a plain loop (the benchmark's baseline) runs the very same functions.

`ref` says where a row came from ("file.parquet#12", "folder/a.png (metadata.csv line 3)",
"shapes:seed=0#7"), so a quarantined row can be found; `order` is the row's position in the
whole input, which decides which of two duplicates is kept.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import posixpath
import stat
from collections.abc import Iterator

import pyarrow.parquet as pq

from pipelines.schema import DataSource, ResourcesConfig
from pipelines.storage import InputError, filesystem, fs_path
from pipelines.store.shards import list_parquet

# Rows per read task for csv folders and shapes (Parquet: one task per row group). Each task's
# rows become one output shard, so this is also how much work a killed run can lose.
CHUNK = 64
ORDER_SHIFT = 32  # order = task number << 32 | row number within the task


def _display(path: str, uri: str) -> str:
    return f"s3://{path}" if uri.startswith("s3://") else path


def _parquet_files(uri: str, resources: ResourcesConfig) -> list[str]:
    fs = filesystem(uri, resources)
    root = fs_path(uri)
    if not fs.exists(root):
        raise FileNotFoundError(f"data source {uri}: no such file or folder")
    if fs.isfile(root):
        return [root]
    files = list_parquet(uri, resources)
    if not files:
        raise FileNotFoundError(f"data source {uri}: no .parquet files in it")
    return files


def read_tasks(sources: list[DataSource], resources: ResourcesConfig) -> list[dict]:
    """Split every source into read tasks (driver side: lists files, reads metadata.csv)."""
    tasks: list[dict] = []
    for src in sources:
        remaining = src.limit
        if src.format == "shapes":
            for start in range(0, src.limit, CHUNK):
                tasks.append({"kind": "shapes", "seed": src.seed, "start": start,
                              "count": min(CHUNK, src.limit - start)})
        elif src.format == "parquet":
            fs = filesystem(src.path, resources)
            for path in _parquet_files(src.path, resources):
                with fs.open(path, "rb") as f:
                    meta = pq.read_metadata(f)
                names = meta.schema.to_arrow_schema().names
                absent = [c for c in (src.image_column, src.caption_column) if c not in names]
                if absent:
                    raise InputError(f"data source {_display(path, src.path)}: no column(s) {absent}; it has {names} "
                                     "(set image_column / caption_column of the source)")
                first = 0  # row index of the row group's first row within the file
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    count = rows if remaining is None else min(rows, remaining)
                    if count:
                        tasks.append({"kind": "parquet", "file": _display(path, src.path), "row_group": g,
                                      "first": first, "count": count, "long_captions": src.long_captions,
                                      "image_column": src.image_column, "caption_column": src.caption_column})
                    first += rows
                    if remaining is not None:
                        remaining -= count
                        if remaining <= 0:
                            break
                if remaining is not None and remaining <= 0:
                    break
        else:
            rows = _metadata_rows(src, resources)
            if remaining is not None:
                rows = rows[:remaining]
            folder = src.path.rstrip("/")
            for start in range(0, len(rows), CHUNK):
                tasks.append({"kind": "imagefolder", "folder": folder, "rows": rows[start:start + CHUNK],
                              "long_captions": src.long_captions})
    for i, t in enumerate(tasks):
        t["task"] = i
    return tasks


def _metadata_rows(src: DataSource, resources: ResourcesConfig) -> list[list]:
    """[line, file_name, caption] per row of the folder's metadata.csv."""
    uri = f"{src.path.rstrip('/')}/metadata.csv"
    fs = filesystem(uri, resources)
    try:
        with fs.open(fs_path(uri), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"data source {src.path}: an imagefolder source needs a metadata.csv "
                                f"(columns file_name, {src.caption_column})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputError(f"{uri}: not UTF-8 text (byte {data[err.start:err.start + 1]!r} at offset {err.start}, "
                         f"line {line}); save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    need = {"file_name", src.caption_column}
    if not need <= set(reader.fieldnames or ()):
        raise InputError(f"{uri}: columns {reader.fieldnames} lack {sorted(need - set(reader.fieldnames or ()))}")
    try:
        # line numbers as a text editor shows them (header = line 1)
        return [[reader.line_num, row["file_name"], row[src.caption_column]] for row in reader]
    except csv.Error as err:
        raise InputError(f"{uri}: line {reader.line_num}: {err}") from None


def _batch(task: int, refs, images, captions, missing, long_captions: str = "truncate") -> dict:
    # long_captions: the source's setting, per row, for the checks (a Ray Data batch has only columns)
    return {"ref": list(refs), "order": [(task << ORDER_SHIFT) | i for i in range(len(refs))],
            "image": list(images), "caption": list(captions), "missing": list(missing),
            "long_captions": [long_captions] * len(refs)}


def read_task(task: dict, resources: ResourcesConfig) -> Iterator[dict]:
    """Yield column batches of one read task. Unreadable rows are not errors here: a missing
    file comes back with `image=None` and the reason in `missing`, for the quarantine."""
    kind, n = task["kind"], task["task"]
    if kind == "shapes":
        from swd_core.toy.shapes import dataset

        refs, images, captions = [], [], []
        for i, sample, image in dataset(task["seed"], task["count"], task["start"]):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            refs.append(f"shapes:seed={task['seed']}#{i}")
            images.append(buf.getvalue())
            captions.append(sample.caption)
        yield _batch(n, refs, images, captions, [None] * len(refs))
    elif kind == "parquet":
        fs = filesystem(task["file"], resources)
        icol, ccol = task["image_column"], task["caption_column"]
        done = 0
        with fs.open(fs_path(task["file"]), "rb") as f:
            pf = pq.ParquetFile(f)
            absent = [c for c in (icol, ccol) if c not in pf.schema_arrow.names]
            if absent:
                raise InputError(f"{task['file']}: no column(s) {absent}; it has {pf.schema_arrow.names} "
                                 "(set image_column / caption_column of the source)")
            for rb in pf.iter_batches(batch_size=256, row_groups=[task["row_group"]], columns=[icol, ccol]):
                rb = rb.slice(0, task["count"] - done)
                images = [_image_bytes(v) for v in rb.column(icol).to_pylist()]
                captions = rb.column(ccol).to_pylist()
                refs = [f"{task['file']}#{task['first'] + done + i}" for i in range(rb.num_rows)]
                missing = ["no image bytes in the row" if b is None else None for b in images]
                batch = _batch(n, refs, images, captions, missing, task.get("long_captions", "truncate"))
                batch["order"] = [(n << ORDER_SHIFT) | (done + i) for i in range(rb.num_rows)]
                yield batch
                done += rb.num_rows
                if done >= task["count"]:
                    break
    elif kind == "imagefolder":
        folder = task["folder"]
        fs = filesystem(folder, resources)
        refs, images, captions, missing = [], [], [], []
        for line, name, caption in task["rows"]:
            path, refused = inside(folder, name)
            refs.append(f"{path} (metadata.csv line {line})")
            captions.append(caption)
            images.append(None)
            if refused:  # never opened
                missing.append(refused)
                continue
            try:
                images[-1] = fs.cat_file(fs_path(path)) if folder.startswith("s3://") else read_regular_file(path)
                missing.append(None)
            except NotRegularFile as err:
                missing.append(f"not_a_file: {err}")
            except FileNotFoundError as err:
                missing.append(f"{type(err).__name__}: {path}")
            except OSError as err:  # permission denied, an I/O error: this row only
                if err.errno == errno.ENAMETOOLONG:
                    missing.append(f"bad_path: file_name {name!r:.60}... is too long ({len(name)} characters)")
                else:
                    missing.append(f"unreadable: {type(err).__name__}: {err}")
            except Exception as err:  # noqa: BLE001 - a timeout, a refused request: this row only
                missing.append(f"unreadable: {type(err).__name__}: {err}")
        yield _batch(n, refs, images, captions, missing, task.get("long_captions", "truncate"))
    else:
        raise ValueError(f"unknown read task kind {kind!r}")


def inside(folder: str, name) -> tuple[str, str | None]:
    """(the path of `name` in `folder`, why it is refused or None): `bad_path: ...` for a name no
    file can have (empty, a NUL byte, too long), `outside_source: ...` for one outside the folder.
    Local folders compare real paths, symlinks resolved; on s3:// a key may not be absolute or
    climb with `..`."""
    if not isinstance(name, str) or not name or "\0" in name:
        why = "holds a NUL byte" if isinstance(name, str) and "\0" in name else "is not a file name"
        return f"{folder}/{name!r}", f"bad_path: file_name {name!r} {why}"
    path = posixpath.join(folder, name)
    if folder.startswith("s3://"):
        parts = name.split("/")
        if name.startswith("/") or "://" in name or ".." in parts:
            return path, f"outside_source: file_name {name!r} leaves {folder}"
        return path, None
    try:
        root = os.path.realpath(folder)
        real = os.path.realpath(os.path.join(folder, name))
    except (OSError, ValueError) as err:  # ENAMETOOLONG, a name the OS cannot take
        return path, f"bad_path: file_name {name!r:.80}: {type(err).__name__}: {err}"
    if os.path.commonpath([root, real]) != root:
        return path, f"outside_source: file_name {name!r} resolves to {real}, outside {root}"
    return path, None


class NotRegularFile(OSError):
    """A path that names a directory, FIFO, socket or device, not a file."""


FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _file_type(mode: int) -> str:
    return next((what for test, what in FILE_TYPES if test(mode)), f"not a regular file (mode {mode:o})")


def read_regular_file(path: str) -> bytes:
    """The bytes of a local regular file. Anything else raises `NotRegularFile` unopened: a FIFO
    would block the read forever, a device could stream without end. The open is non-blocking and
    checked again on the descriptor, so a file swapped for a FIFO after the first check cannot block."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path} is {_file_type(mode)}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is {_file_type(mode)}")
        return f.read()


def _image_bytes(value):
    """Image cells are bytes, or a Hugging Face datasets Image struct {bytes, path}."""
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def iter_batches(tasks: list[dict], resources: ResourcesConfig) -> Iterator[dict]:
    """All batches of all tasks in one process (the Ray-free path)."""
    for t in tasks:
        yield from read_task(t, resources)


def ray_dataset(tasks: list[dict], resources: ResourcesConfig):
    """The same reading as a Ray Dataset: one Ray task per read task, streamed. Map it with
    `batch_size=None` (a call per read task's block): Ray Data fuses the read into the next map and
    bundles the one-row read items up to that map's batch size, so a row count there would put many
    read tasks into one call."""
    import ray.data

    items = [{"task": json.dumps(t)} for t in tasks]

    def read(batch):
        for t in batch["task"]:
            yield from read_task(json.loads(t), resources)

    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(read, batch_size=1)


def read_prompts(uri: str, resources: ResourcesConfig) -> list[str]:
    """Prompts for synthesize: a text file (one per line) or a Parquet file/folder with a
    `prompt` column, local or s3://, or a built-in set (`builtin:parti[?category=...]`,
    pipelines/prompt_sets.py). Blank lines are skipped."""
    return read_prompts_and_images(uri, resources)[0]


def read_prompts_and_images(uri: str, resources: ResourcesConfig) -> tuple[list[str], list[bytes] | None]:
    """(prompts, the image bytes of each prompt or None): Parquet with an `image` column beside
    `prompt` (bytes, or a Hugging Face image struct) holds images of its prompts, as a caption
    set such as COCO's does; a text file or a built-in set holds none."""
    if uri.startswith("builtin:"):
        from pipelines.prompt_sets import builtin_prompts

        return builtin_prompts(uri), None
    fs = filesystem(uri, resources)
    if uri.endswith(".parquet") or (fs.exists(fs_path(uri)) and fs.isdir(fs_path(uri))):
        prompts, images, with_images = [], [], None
        for path in _parquet_files(uri, resources):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            if "prompt" not in table.column_names:
                raise ValueError(f"{_display(path, uri)}: no `prompt` column; it has {table.column_names}")
            has = "image" in table.column_names
            with_images = has if with_images is None else with_images and has
            prompts.extend(table.column("prompt").to_pylist())
            images.extend([_image_bytes(v) for v in table.column("image").to_pylist()] if has
                          else [None] * table.num_rows)
        keep = [i for i, p in enumerate(prompts) if p and p.strip()]
        kept_images = [images[i] for i in keep]
        return [prompts[i].strip() for i in keep], (kept_images if with_images and all(kept_images) else None)
    try:
        with fs.open(fs_path(uri), "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"data.prompts {uri}: no such file") from None
    return [line.strip() for line in text.splitlines() if line.strip()], None
