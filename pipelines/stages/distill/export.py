"""The distilled student as the stage hands it on: a merged diffusers pipeline folder (and a PEFT
LoRA in LoRA mode) with a sample grid, under `student_dir`, and with validation the record of
the chosen step (`RECORD_FILE`)."""

from __future__ import annotations

import json
import tempfile
import time

from pipelines.logs import logger
from pipelines.schema import PipelineConfig

log = logger(__name__)

RECORD_FILE = "validation.json"  # in the export: the chosen step and every score (distill.validation)


def student_dir(cfg: PipelineConfig) -> str:
    """Where the distilled student is exported (and the export's validation record lives)."""
    return f"{cfg.run_dir}/student"


def export_student(cfg, rank, student_engine, adapter, nets, final: bool, step: int | None = None,
                   *, validation: dict | None = None) -> None:
    """Rank 0 writes the student as a PEFT LoRA (LoRA mode) and a merged diffusers pipeline
    folder, plus a sample grid, to <run_dir>/student (or student/step_<n>); with a `validation`
    record (the chosen step and the score history) also `validation.json`, last: until it is
    there again, the export names no step (`Validation.restore` checks it on resume)."""
    from swd_core.export import export_lora, export_merged_pipeline

    full = not nets.lora_student
    state = None
    t0 = time.monotonic()
    what = "the student" + ("" if final else f" at step {step}")

    def say(doing: str) -> None:  # the export takes minutes for a large model: one line per part
        log.info(f"exporting {what}: {doing}")

    if full:  # every rank takes part in gathering ZeRO-3 shards
        if cfg.distill.zero_stage == 3:
            if rank == 0:
                say("gathering the ZeRO-3 shards of the student's weights")
            state = student_engine._zero3_consolidated_16bit_state_dict()
        else:
            state = student_engine.module.state_dict()
    if rank != 0:
        return
    from pipelines.storage import filesystem, upload_dir

    dest = student_dir(cfg) + ("" if final else f"/step_{step}")
    if final:  # the previous export's record must not name the new weights
        try:
            filesystem(dest, cfg.resources).rm(f"{dest}/{RECORD_FILE}")
        except FileNotFoundError:
            pass
    with tempfile.TemporaryDirectory() as tmp:
        t = cfg.teacher
        # FLUX: the guidance the student's embedding was trained at, which its sampling must feed it
        folder = dict(max_sequence_length=t.max_sequence_length, dtype=t.dtype, family=t.family,
                      guidance_scale=adapter.guidance_scale)
        if full:
            say("writing merged/ (the teacher's pipeline with the student's transformer)")
            student = type(nets.student_transformer).from_config(nets.student_transformer.config)
            student.load_state_dict({k: v.float() for k, v in state.items()})
            export_merged_pipeline(t.path, f"{tmp}/merged", cfg.schedule(), transformer=student, **folder)
        else:
            say("writing lora/ (the student's LoRA adapter)")
            export_lora(adapter, f"{tmp}/lora")
            say("merging the LoRA into the teacher's transformer, writing merged/")
            export_merged_pipeline(t.path, f"{tmp}/merged", cfg.schedule(), lora_dir=f"{tmp}/lora", **folder)
        say(f"sampling samples.png ({len(cfg.data.preview_prompts)} preview prompts) with merged/")
        _sample_grid(cfg, f"{tmp}/merged", f"{tmp}/samples.png", str(adapter.device))
        say(f"copying to {dest}")
        upload_dir(tmp, dest, cfg.resources)
    if validation is not None:
        write_record(dest, validation, cfg.resources)
    log.info(f"exported {what} to {dest} (merged/, {'' if full else 'lora/, '}samples.png) "
             f"in {time.monotonic() - t0:.0f} s")


def write_record(export: str, record: dict, resources) -> None:
    """Writes the validation `record` (the chosen step and every score) into the export at `export`."""
    from pipelines.storage import write_bytes

    write_bytes(f"{export}/{RECORD_FILE}", json.dumps(record, indent=2).encode(), resources)


def _sample_grid(cfg: PipelineConfig, merged_dir: str, out_png: str, device: str = "cpu") -> None:
    """The preview prompts sampled by the export, on the training worker's device and dtype."""
    from swd_core.evaluate_model import load_exported_student
    from swd_core.generate import generate_images
    from swd_core.grid import image_grid

    adapter, schedule, _ = load_exported_student(merged_dir, cfg.teacher.family, cfg.teacher.dtype, device)
    prompts = cfg.data.preview_prompts
    seeds = [cfg.evaluate.seed + i for i in range(len(prompts))]
    images = generate_images(adapter, prompts, seeds, schedule=schedule)
    image_grid([[im] for im in images], prompts, [f"student, {schedule.num_steps} steps"],
               title=f"{cfg.name}: scales {list(schedule.scales)}").save(out_png)
