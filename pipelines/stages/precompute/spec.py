"""What both passes of the precompute stage need to know about the teacher and the store."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines import store
from pipelines.schema import PipelineConfig


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
    gpus: float = 0.0  # precompute.gpus_per_actor: > 0 puts the encoders on the GPU Ray assigns

    @property
    def min_side(self) -> int:
        return max(self.scales) * self.downsample

    @staticmethod
    def from_config(cfg: PipelineConfig) -> EncodeSpec:
        return EncodeSpec(cfg.teacher.path, cfg.teacher.family, cfg.teacher.dtype, cfg.teacher.max_sequence_length,
                          tuple(store.stored_scales(cfg)), store.vae_settings(cfg.teacher.path)["downsample"],
                          cfg.precompute.storage_dtype, max(1, int(cfg.precompute.cpus_per_actor)),
                          cfg.precompute.batch_size, cfg.precompute.gpus_per_actor)
