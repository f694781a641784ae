"""The served model: an exported student folder (swd_core.export.export_merged_pipeline) loaded
through the family adapter, and batch sampling to PNG bytes.

A batch is sampled at the size that arrived, unless `batch_size` is given (the definition's
`serve.deterministic_batching`): then it is padded to exactly that many rows. CPU (and GPU)
kernels pick their algorithm by batch size, so the same seed sampled in a batch of 1 and a batch
of 8 differs in the last float bits and then in a few pixels; only the fixed shape makes a
request's pixels depend on its own prompt and seed alone (tests/test_serve.py checks this
pixel-exactly). The padding's cost is idle rows under light load.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from pipelines.schema import PipelineConfig, ResourcesConfig
from pipelines.storage import local_copy
from swd_core.adapters import FamilyAdapter
from swd_core.evaluate_model import load_exported_student
from swd_core.generate import generate_images
from swd_core.schedules import ScaleSchedule


@dataclass
class ServedModel:
    source: str  # what the definition named: a local folder or an s3:// prefix
    model_id: str
    adapter: FamilyAdapter
    schedule: ScaleSchedule
    record: dict  # swd_schedule.json
    loaded_at: float = field(default_factory=time.time)

    @property
    def size(self) -> str:
        side = self.record["output_size"]
        return f"{side}x{side}"

    def info(self) -> dict:
        """The `/v1/models` entry (OpenAI's model object plus what was loaded)."""
        return {
            "id": self.model_id, "object": "model", "created": int(self.loaded_at), "owned_by": "swd-ray",
            "source": self.source, "teacher": self.record.get("teacher"), "sizes": [self.size],
            "schedule": {k: self.record[k] for k in ("scales", "sigmas", "boundaries", "output_size")},
            "device": str(self.adapter.device),
        }


def default_model_source(cfg: PipelineConfig) -> str:
    """The distill stage's export unless the definition names another model."""
    return cfg.serve.model or f"{cfg.run_dir}/student/merged"


def load_student(cfg: PipelineConfig, source: str, model_id: str, device: str = "cpu") -> ServedModel:
    return load_served(source, model_id, cfg.teacher.family, cfg.teacher.dtype, cfg.resources, device)


def load_served(source: str, model_id: str, family: str, dtype: str, resources: ResourcesConfig,
                device: str = "cpu") -> ServedModel:
    folder = local_copy(source, resources)
    if not folder.exists():
        raise FileNotFoundError(f"no exported student at {source}: run the distill stage, or set serve.model "
                                "to an exported folder (local path or s3://)")
    # the evaluate stage's loader: the folder's family and embedded guidance (swd_schedule.json)
    adapter, schedule, record = load_exported_student(str(folder), family, dtype, device)
    return ServedModel(source, model_id, adapter, schedule, record)


def render_pngs(model: ServedModel, prompts: Sequence[str], seeds: Sequence[int],
                batch_size: int | None = None) -> list[bytes]:
    """Sample `prompts` with their `seeds` in one batch; PNG bytes out. With `batch_size` the batch
    is padded to that many rows (bit-identical results across batch sizes), else it is as given."""
    if not prompts or (batch_size is not None and len(prompts) > batch_size):
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size}")
    pad = 0 if batch_size is None else batch_size - len(prompts)
    # Padding rows repeat the first request: real inputs, results discarded.
    images = generate_images(model.adapter, [*prompts, *[prompts[0]] * pad], [*seeds, *[seeds[0]] * pad],
                             schedule=model.schedule)
    out = []
    for image in images[: len(prompts)]:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def torch_threads(cpus: float) -> int:
    """One intra-op thread per reserved CPU, so co-located replicas do not oversubscribe cores."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n
