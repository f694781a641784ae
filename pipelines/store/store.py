"""The store as a whole: where it is for a definition, `open_store` (which checks its manifest
against the definition), the `Store` object that travels to Ray Train workers, and the Ray-free
`read_rows`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipelines.schema import PipelineConfig, ResourcesConfig
from pipelines.storage import arrow_filesystem, filesystem, fs_path, read_json, write_bytes
from pipelines.store.codec import decode_numpy
from pipelines.store.manifest import MANIFEST, expected_manifest, manifest_differences
from pipelines.store.shards import file_rows, list_parquet

EMPTY_PROMPT = "empty_prompt.safetensors"
DATA, QUARANTINE = "data", "quarantine"


class StoreMismatchError(ValueError):
    """A store that was not made by (or for) this pipeline definition, or no store at all."""


def store_uri(cfg: PipelineConfig) -> str:
    return (cfg.precompute.output or f"{cfg.run_dir}/store").rstrip("/")


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
        # Ray Data's V1 Parquet reader: V2 (Ray 2.60's default) lists the named files again in a
        # task of its own before the first read, which makes every execution (each distill run's
        # first batch, each epoch that streams) several seconds slower on a store's few files
        # (bench/store_read.py).
        ctx = ray.data.DataContext.get_current()
        v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            return ray.data.read_parquet(files, filesystem=arrow_filesystem(self.uri, self.resources), columns=columns)
        finally:
            ctx.use_datasource_v2 = v2

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
    stored_family = manifest.get("teacher", {}).get("family", "sd3")  # stores before FLUX were SD3's
    if stored_family != cfg.teacher.family:
        # first and alone: another family's embeddings and latents differ in every other field too
        raise StoreMismatchError(
            f"the store at {uri} holds a {stored_family!r} teacher's text embeddings and latents "
            f"({manifest.get('teacher', {}).get('path')!r}), and this definition's teacher is family "
            f"{cfg.teacher.family!r} ({cfg.teacher.path!r}); precompute a store for it into another "
            "`precompute.output`, or use the definition that made this one")
    diffs = manifest_differences(manifest, expected_manifest(cfg))
    if diffs:
        raise StoreMismatchError(f"the store at {uri} does not match this pipeline definition:\n  - "
                                 + "\n  - ".join(diffs)
                                 + "\nrerun the precompute stage into another `precompute.output`, "
                                 "or use the definition that made it")
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
    write_bytes(f"{uri}/{EMPTY_PROMPT}", data, resources)
