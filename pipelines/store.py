"""The precomputed store (DESIGN.md §5): what the precompute stage writes and distill reads.

Layout under the store URI (a local folder or an s3:// prefix):

    manifest.json             what made the store (teacher, VAE, scales, dtypes, text settings, rows)
    empty_prompt.safetensors  `prompt_embeds` (1, L, D) and `pooled_prompt_embeds` (1, P) for CFG
    data/*.parquet            one row per sample: sample_id, caption, prompt_embeds,
                              pooled_prompt_embeds, latents_<s> for every scale s
    quarantine/*.parquet      inputs that were refused: ref, sample_id, reason, detail

Tensor columns are Parquet `binary`: the raw little-endian C-order values of one sample in the
manifest's `storage_dtype` (shape from the manifest), so any Parquet reader can get them back;
`read_rows` does it with pyarrow and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.schema import PipelineConfig, ResourcesConfig
from pipelines.storage import filesystem

VERSION = 1
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
DATA, QUARANTINE = "data", "quarantine"
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class StoreMismatchError(ValueError):
    """A store that was not made by (or for) this pipeline definition, or no store at all."""


def store_uri(cfg: PipelineConfig) -> str:
    return (cfg.precompute.output or f"{cfg.run_dir}/store").rstrip("/")


def latent_column(scale: int) -> str:
    return f"latents_{scale}"


# ---------------------------------------------------------------- files


def fs_path(uri: str) -> str:
    """fsspec/pyarrow paths: s3 without the scheme, local absolute."""
    return uri.removeprefix("s3://") if uri.startswith("s3://") else str(Path(uri).resolve())


def arrow_filesystem(uri: str, resources: ResourcesConfig):
    """A pyarrow filesystem for `uri` (s3fs wrapped, so the endpoint from the definition applies:
    pyarrow itself ignores endpoint environment variables)."""
    from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

    if uri.startswith("s3://"):
        return PyFileSystem(FSSpecHandler(filesystem(uri, resources)))
    return LocalFileSystem()


def list_parquet(uri: str, resources: ResourcesConfig) -> list[str]:
    """Parquet files under `uri` (stripped paths, sorted); hidden/temporary names skipped."""
    fs = filesystem(uri, resources)
    root = fs_path(uri)
    if not fs.exists(root):
        return []
    files = [f for f in fs.find(root) if f.endswith(".parquet")]
    return sorted(f for f in files if not posixpath.basename(f).startswith((".", "_")))


def read_json(uri: str, resources: ResourcesConfig) -> dict | None:
    fs = filesystem(uri, resources)
    try:
        with fs.open(fs_path(uri), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_file(uri: str, data: bytes, resources: ResourcesConfig) -> None:
    from pipelines.storage import write_bytes

    write_bytes(uri, data, resources)


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


FOOTER_READERS = 16  # footer reads in flight at once


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


# ---------------------------------------------------------------- manifest


def teacher_content_hash(path: str) -> str:
    """Cheap identity of a teacher: its config JSONs plus weight file names and sizes (reading
    gigabytes of weights to hash them would cost more than the check is worth). A hub id that is
    not a local folder is identified by the id itself."""
    from swd_core.tiny_models import resolve_pretrained

    folder = Path(resolve_pretrained(path))
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"id:{path}".encode())
        return h.hexdigest()[:16]
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if f.suffix == ".json":
            h.update(rel.encode() + b"\0" + f.read_bytes())
        else:
            h.update(f"{rel}\0{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def vae_settings(teacher_path: str) -> dict:
    """Scaling/shift and downsampling factor from the VAE config (no weights loaded)."""
    from diffusers import AutoencoderKL

    from swd_core.tiny_models import resolve_pretrained

    vcfg = AutoencoderKL.load_config(resolve_pretrained(teacher_path), subfolder="vae")
    return {
        "scaling_factor": float(vcfg["scaling_factor"]),
        "shift_factor": float(vcfg.get("shift_factor") or 0.0),
        # as diffusers' SD3 pipeline computes vae_scale_factor
        "downsample": 2 ** (len(vcfg["block_out_channels"]) - 1),
        "latent_channels": int(vcfg["latent_channels"]),
    }


def stored_scales(cfg) -> list[int]:
    """The latent sizes a store holds for a definition: each scale of its schedule once, in
    schedule order (a full-resolution schedule repeats its one scale at every step)."""
    return list(dict.fromkeys(int(s) for s in cfg.schedule().scales))


def expected_manifest(cfg: PipelineConfig) -> dict:
    """The manifest fields a store made for `cfg` must have (computed without loading models)."""
    vae = vae_settings(cfg.teacher.path)
    return {
        "version": VERSION,
        "teacher": {"path": cfg.teacher.path, "family": cfg.teacher.family,
                    "content_hash": teacher_content_hash(cfg.teacher.path)},
        "vae": {k: vae[k] for k in ("scaling_factor", "shift_factor", "downsample")},
        "scales": stored_scales(cfg),
        "latent_channels": vae["latent_channels"],
        "storage_dtype": cfg.precompute.storage_dtype,
        "text": {"max_sequence_length": cfg.teacher.max_sequence_length},
    }


# (label, getter) of every field that changes the stored values; the teacher's path is not
# among them (a moved folder with the same content is the same teacher).
COMPARED = (
    ("version", lambda m: m.get("version")),
    ("teacher.family", lambda m: m.get("teacher", {}).get("family")),
    ("teacher.content_hash", lambda m: m.get("teacher", {}).get("content_hash")),
    ("vae.scaling_factor", lambda m: m.get("vae", {}).get("scaling_factor")),
    ("vae.shift_factor", lambda m: m.get("vae", {}).get("shift_factor")),
    ("vae.downsample", lambda m: m.get("vae", {}).get("downsample")),
    ("scales", lambda m: m.get("scales")),
    ("latent_channels", lambda m: m.get("latent_channels")),
    ("storage_dtype", lambda m: m.get("storage_dtype")),
    ("text.max_sequence_length", lambda m: m.get("text", {}).get("max_sequence_length")),
)


def manifest_differences(stored: dict, expected: dict) -> list[str]:
    out = []
    for label, get in COMPARED:
        if get(stored) != get(expected):
            out.append(f"{label}: store has {get(stored)!r}, definition has {get(expected)!r}")
    if out and stored.get("teacher", {}).get("path") != expected["teacher"]["path"]:
        out.append(f"(teacher.path: store has {stored.get('teacher', {}).get('path')!r}, "
                   f"definition has {expected['teacher']['path']!r})")
    return out


# ---------------------------------------------------------------- reading


def _decode_column(values, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A column of raw tensor bytes -> float32 array (B, *shape)."""
    buf = b"".join(values)
    if dtype == "bfloat16":  # numpy has no bfloat16: its bits are the top half of a float32
        arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(buf, dtype={"float16": "<f2", "float32": "<f4"}[dtype]).astype(np.float32)
    return arr.reshape(len(values), *shape)


def encode_tensor(t, dtype: str) -> bytes:
    """A torch tensor -> raw little-endian C-order bytes in the storage dtype."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype({"float16": "<f2", "float32": "<f4"}[dtype]).tobytes()


def column_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    c = manifest["latent_channels"]
    shapes = {"prompt_embeds": tuple(manifest["text"]["prompt_embeds_shape"]),
              "pooled_prompt_embeds": tuple(manifest["text"]["pooled_shape"])}
    shapes.update({latent_column(s): (c, s, s) for s in manifest["scales"]})
    return shapes


def decode_numpy(batch: dict, manifest: dict) -> dict:
    """Tensor columns of a batch (dict of column -> sequence of bytes) -> float32 numpy arrays;
    other columns pass through as lists."""
    shapes, dtype = column_shapes(manifest), manifest["storage_dtype"]
    return {k: _decode_column(list(v), dtype, shapes[k]) if k in shapes else list(v) for k, v in batch.items()}


def read_rows(uri: str, columns: list[str] | None = None, *, endpoint_url: str | None = None,
              batch_size: int = 256) -> Iterator[dict]:
    """Ray-free reader: yield one dict per stored sample, tensors as float32 numpy arrays.

        for row in read_rows("runs/toy/store", columns=["caption", "latents_16"]):
            row["latents_16"]  # (C, 16, 16) float32
    """
    from pipelines.schema import S3Config

    resources = ResourcesConfig(s3=S3Config(endpoint_url=endpoint_url))
    manifest = read_json(f"{uri.rstrip('/')}/{MANIFEST}", resources)
    if manifest is None:
        raise StoreMismatchError(f"{uri}: no {MANIFEST}; run the precompute stage first")
    fs = filesystem(uri, resources)
    for path in list_parquet(f"{uri.rstrip('/')}/{DATA}", resources):
        with fs.open(path, "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                batch = decode_numpy(rb.to_pydict(), manifest)
                for i in range(rb.num_rows):
                    yield {k: v[i] for k, v in batch.items()}


# ---------------------------------------------------------------- the store object


@dataclass
class Store:
    """A validated store; small and picklable (it travels to Ray Train workers)."""

    uri: str
    manifest: dict
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def scales(self) -> list[int]:
        return list(self.manifest["scales"])

    def files(self) -> list[str]:
        return list_parquet(f"{self.uri}/{DATA}", self.resources)

    def file_rows(self) -> list[tuple[str, int]]:
        return file_rows(f"{self.uri}/{DATA}", self.resources)

    def data_root(self) -> str:
        """The data folder as the filesystem names it (the prefix of every `file_rows` path)."""
        return fs_path(f"{self.uri}/{DATA}")

    def dataset(self, columns: list[str] | None = None, files: list[str] | None = None):
        """A Ray Dataset of the data files (or of `files`, a subset, read in that order)."""
        import ray.data

        files = self.files() if files is None else files
        if not files:
            raise StoreMismatchError(f"{self.uri}: the store has no data files; run the precompute stage")
        return ray.data.read_parquet(files, filesystem=arrow_filesystem(self.uri, self.resources), columns=columns)

    def empty_prompt(self):
        import torch
        from safetensors.torch import load

        fs = filesystem(self.uri, self.resources)
        with fs.open(fs_path(f"{self.uri}/{self.manifest.get('empty_prompt', EMPTY_PROMPT)}"), "rb") as f:
            tensors = load(f.read())
        return tensors["prompt_embeds"].to(torch.float32), tensors["pooled_prompt_embeds"].to(torch.float32)

    def decode(self, batch: dict) -> dict:
        """A numpy batch from `dataset().iter_batches(batch_format="numpy")` -> float32 torch
        tensors (B, L, D), (B, P), (B, C, s, s); `sample_id`/`caption` as lists."""
        import torch

        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in decode_numpy(batch, self.manifest).items()}

    def read_rows(self, columns: list[str] | None = None) -> Iterator[dict]:
        return read_rows(self.uri, columns, endpoint_url=self.resources.s3.endpoint_url)


def open_store(cfg: PipelineConfig) -> Store:
    """The store for `cfg`, after checking that its manifest matches the definition."""
    uri = store_uri(cfg)
    manifest = read_json(f"{uri}/{MANIFEST}", cfg.resources)
    if manifest is None:
        raise StoreMismatchError(f"no precomputed store at {uri} (no {MANIFEST}); run the precompute stage first: "
                                 f"python pipelines/distill.py --config <definition> --stages precompute")
    diffs = manifest_differences(manifest, expected_manifest(cfg))
    if diffs:
        raise StoreMismatchError(f"the store at {uri} does not match this pipeline definition:\n  - "
                                 + "\n  - ".join(diffs)
                                 + "\nrerun the precompute stage into another `precompute.output`, or use the definition that made it")
    if not manifest.get("complete", False):
        raise StoreMismatchError(f"the store at {uri} is incomplete: its last precompute run did not finish "
                                 "(killed?); rerun the precompute stage, it resumes where it stopped")
    return Store(uri, manifest, cfg.resources)


def save_empty_prompt(uri: str, prompt_embeds, pooled, dtype: str, resources: ResourcesConfig) -> None:
    from safetensors.torch import save

    from swd_core.adapters.sd3 import torch_dtype

    td = torch_dtype(dtype)
    data = save({"prompt_embeds": prompt_embeds.to(td).contiguous(),
                 "pooled_prompt_embeds": pooled.to(td).contiguous()})
    write_file(f"{uri}/{EMPTY_PROMPT}", data, resources)
