"""A stand-in student: the teacher's own transformer (optionally perturbed) exported in the
student format, so the serving path can be exercised and benchmarked before a distilled student
exists. It goes through `export_merged_pipeline` exactly as the distill stage's export does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.schema import PipelineConfig
from swd_core.export import export_merged_pipeline


def export_stand_in(cfg: PipelineConfig, out_dir: str | Path, perturb: float = 0.0, seed: int = 0) -> Path:
    """`perturb` > 0 adds seeded Gaussian noise of that relative size to the transformer's output
    projection: a second, visibly different model for hot-swap tests."""
    from swd_core.adapters import load_adapter

    t = cfg.teacher
    teacher = load_adapter(t.family, t.path, dtype=t.dtype, max_sequence_length=t.max_sequence_length,
                           load_text_encoders=False)
    transformer = teacher.transformer
    if perturb:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in transformer.proj_out.parameters():
                p.add_(perturb * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return export_merged_pipeline(t.path, out_dir, cfg.schedule(), transformer=transformer,
                                  max_sequence_length=t.max_sequence_length, dtype=t.dtype, family=t.family,
                                  guidance_scale=teacher.guidance_scale)
