"""The store's Parquet files (its data and quarantine shards): listing, row counts from the
footers, one column of all of them, and the removal of files a killed run left half written."""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow.parquet as pq

from pipelines.schema import ResourcesConfig
from pipelines.storage import filesystem, fs_path

FOOTER_READERS = 16  # footer reads in flight at once


def list_parquet(uri: str, resources: ResourcesConfig) -> list[str]:
    """Parquet files under `uri` (stripped paths, sorted); hidden/temporary names skipped."""
    fs = filesystem(uri, resources)
    root = fs_path(uri)
    if not fs.exists(root):
        return []
    files = [f for f in fs.find(root) if f.endswith(".parquet")]
    return sorted(f for f in files if not posixpath.basename(f).startswith((".", "_")))


def remove_unreadable(uri: str, resources: ResourcesConfig) -> list[str]:
    """Delete Parquet files under `uri` whose footer cannot be read (a run killed mid-write
    leaves them); returns what was removed. Complete files are kept: their rows count as done."""
    fs = filesystem(uri, resources)
    removed = []
    for path in list_parquet(uri, resources):
        try:
            _footer(fs, path)
        except Exception:  # noqa: BLE001 - any unreadable footer means a partial file
            fs.rm(path)
            removed.append(path)
    return removed


def _footer(fs, path: str):
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f)


def file_rows(uri: str, resources: ResourcesConfig) -> list[tuple[str, int]]:
    """(path, row count) of every Parquet file under `uri`, in `list_parquet` order; footers only,
    read concurrently: on S3 each footer is a few round trips, and a loop over thousands of files
    would wait on their latency one by one."""
    fs = filesystem(uri, resources)
    paths = list_parquet(uri, resources)
    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_READERS, len(paths)))) as pool:
        return list(zip(paths, (meta.num_rows for meta in pool.map(partial(_footer, fs), paths))))


def count_rows(uri: str, resources: ResourcesConfig) -> int:
    return sum(n for _, n in file_rows(uri, resources))


def read_column(uri: str, column: str, resources: ResourcesConfig) -> list:
    """One column of every Parquet file under `uri` (e.g. the sample ids already stored)."""
    fs = filesystem(uri, resources)
    out = []
    for path in list_parquet(uri, resources):
        with fs.open(path, "rb") as f:
            out.extend(pq.read_table(f, columns=[column]).column(column).to_pylist())
    return out
