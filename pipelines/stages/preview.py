"""Preview stage: sample the held prompts with the teacher (multi-step, CFG), the full-resolution
few-step sampler and the scale-wise sampler, and write one labelled PNG grid.

Before distillation all three run the teacher's weights, which shows what the few-step
samplers start from; after distillation the same grid is made for the student.
"""

from __future__ import annotations

import time

from pipelines.logs import logger
from pipelines.schema import PipelineConfig
from pipelines.storage import write_png
from swd_core.adapters import load_adapter
from swd_core.generate import generate_images
from swd_core.grid import image_grid

log = logger(__name__)


def run(cfg: PipelineConfig) -> dict:
    """The stage: one Ray task with the evaluate stage's resources (`evaluate.cpus` / `.gpus`)."""
    from pipelines.placement import run_as_task

    return run_as_task("preview", preview_here, cfg, cpus=cfg.evaluate.cpus, gpus=cfg.evaluate.gpus)


def preview_here(cfg: PipelineConfig) -> dict:
    from pipelines.placement import stage_device

    device = stage_device("preview", "evaluate.gpus", cfg.evaluate.gpus)
    adapter = load_adapter(cfg.teacher.family, cfg.teacher.path, dtype=cfg.teacher.dtype, device=device,
                           max_sequence_length=cfg.teacher.max_sequence_length)
    # Both samplers always, whatever `scalewise` says; checked against the loaded transformer.
    schedule = cfg.distill.schedule.model_copy(update={"scalewise": True}).build(adapter.patch_size,
                                                                                 cfg.teacher.family)
    prompts = cfg.data.preview_prompts
    seeds = [cfg.evaluate.seed + i for i in range(len(prompts))]
    ev = cfg.evaluate
    columns = {
        f"teacher {ev.teacher_steps} steps, cfg {ev.teacher_guidance_scale:g}":
            dict(teacher_steps=ev.teacher_steps, guidance=ev.teacher_guidance_scale),
        f"full-res {schedule.num_steps} steps": dict(schedule=schedule.full_resolution()),
        f"scale-wise {schedule.num_steps} steps": dict(schedule=schedule),
    }
    images, timings = {}, {}
    for label, kwargs in columns.items():
        start = time.perf_counter()
        images[label] = generate_images(adapter, prompts, seeds, **kwargs)
        timings[label] = (time.perf_counter() - start) / len(prompts)
        log.info(f"{label}: {timings[label]:.3f} s/image")
    grid = image_grid([[images[c][i] for c in columns] for i in range(len(prompts))], prompts, list(columns),
                      title=f"{cfg.name}: teacher {cfg.teacher.path}  scales {list(schedule.scales)}")
    path = write_png(f"{cfg.run_dir}/preview.png", grid, cfg.resources)
    log.info(f"wrote {path}")
    return {"grid": path, "seconds_per_image": timings, "device": device, "sigmas": list(schedule.sigmas)}
