"""Where a run's inputs and outputs live: a local directory or an s3:// prefix.

The one place that builds filesystems: `filesystem` (fsspec; s3fs for s3://) from the
definition's `resources.s3` (endpoint_url, region), and `arrow_filesystem`, the pyarrow view of
that same filesystem for Ray Data and Ray Train. pyarrow's own S3 client ignores the endpoint
environment variables and reads credentials its own way; wrapping s3fs keeps one set of settings
and one credential chain for every reader and writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec

from pipelines.schema import ResourcesConfig


class InputError(ValueError):
    """An input or output location a stage cannot use at all (not one bad row); the message is
    one line naming it."""


def filesystem(uri: str, resources: ResourcesConfig) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for `uri`: s3fs with the definition's endpoint and region, else local."""
    if uri.startswith("s3://"):
        # Every request times out: a stalled endpoint fails the read instead of hanging the stage.
        # botocore tries once; s3fs retries timeouts and dropped connections (5 tries, backoff).
        timeout = resources.s3.timeout_s
        opts = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"total_max_attempts": 1}}}
        if resources.s3.endpoint_url:
            opts["endpoint_url"] = resources.s3.endpoint_url
        if resources.s3.region:
            opts["client_kwargs"] = {"region_name": resources.s3.region}
        return fsspec.filesystem("s3", **opts)
    return fsspec.filesystem("file")


def arrow_filesystem(uri: str, resources: ResourcesConfig):
    """The pyarrow filesystem for `uri`: `filesystem(uri)` wrapped for s3://, else the local one.
    Paths on it are `fs_path(uri)`."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if uri.startswith("s3://"):
        return PyFileSystem(FSSpecHandler(filesystem(uri, resources)))
    return LocalFileSystem()


def fs_path(uri: str) -> str:
    """`uri` as both filesystems name it: s3 without the scheme, local absolute."""
    return uri.removeprefix("s3://") if uri.startswith("s3://") else str(Path(uri).resolve())


def read_json(uri: str, resources: ResourcesConfig) -> dict | None:
    """The JSON document at `uri`, or None when there is none."""
    fs = filesystem(uri, resources)
    try:
        with fs.open(fs_path(uri), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes, resources: ResourcesConfig) -> str:
    fs = filesystem(uri, resources)
    if not uri.startswith("s3://"):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    with fs.open(uri, "wb") as f:
        f.write(data)
    return uri if uri.startswith("s3://") else os.path.abspath(uri)


def check_writable(uri: str, resources: ResourcesConfig) -> None:
    """Write and remove a probe file under `uri`, so that a stage finds storage it cannot write
    to before it has done any work."""
    probe = f"{uri.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
    try:
        written = write_bytes(probe, b"", resources)
        filesystem(uri, resources).rm_file(fs_path(written))
    except Exception as err:  # noqa: BLE001 - whatever the cause, the message names the place
        raise InputError(f"cannot write to {uri}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         ) from None


def write_png(uri: str, image, resources: ResourcesConfig) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes(uri, buf.getvalue(), resources)


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("SWD_CACHE", Path.home() / ".cache" / "swd" / "s3"))


def local_copy(uri: str, resources: ResourcesConfig, cache_dir: str | None = None) -> Path:
    """A local directory holding `uri`: the path itself when local, else a download of the s3://
    prefix (`from_pretrained` needs local files) into a cache keyed by the URI and by its objects'
    keys, sizes and ETags: a new export at the same URI (a retrained or re-chosen student) is a new
    download, an unchanged one is read from the cache."""
    if not uri.startswith("s3://"):
        return Path(uri)
    fs = filesystem(uri, resources)
    prefix = uri.rstrip("/") + "/"

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def listing() -> str:
        fs.invalidate_cache()
        objects = fs.find(prefix, detail=True)
        return json.dumps(sorted((k, v.get("size"), str(v.get("ETag") or v.get("LastModified")))
                                 for k, v in objects.items())) if objects else ""

    root = _cache_root(cache_dir)
    for _ in range(3):
        before = listing()
        if not before:  # nothing there: no cache entry either; the caller says what is missing
            return root / "missing"
        dest = root / f"{digest(uri)}-{digest(before)}"
        if (dest / ".complete").exists():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        fs.get(prefix, str(dest) + "/", recursive=True)
        if listing() == before:  # not overwritten while it downloaded
            (dest / ".complete").touch()
            for old in root.glob(f"{digest(uri)}-*"):  # earlier exports at this URI
                if old != dest:
                    shutil.rmtree(old, ignore_errors=True)
            return dest
    raise RuntimeError(f"{uri} kept changing while it downloaded (an export in progress?); "
                       "try again when it is written")


def upload_dir(local: str | Path, uri: str, resources: ResourcesConfig) -> str:
    """Copy a local directory to `uri` (local path or s3:// prefix); returns `uri`."""
    if uri.startswith("s3://"):
        filesystem(uri, resources).put(str(local).rstrip("/") + "/", uri.rstrip("/") + "/", recursive=True)
    elif Path(local).resolve() != Path(uri).resolve():
        shutil.copytree(local, uri, dirs_exist_ok=True)
    return uri
