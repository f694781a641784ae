"""Export a distilled student: as a PEFT LoRA (diffusers' LoRA format) and as a merged
diffusers pipeline folder that samples scale-wise with diffusers alone.

The merged folder carries a `FlowMatchLCMScheduler` configured with the schedule's scale
factors (shift 1, so the exact sigmas pass through) and `swd_schedule.json` with the sigmas,
the first-step size and the text length, so a user needs nothing from this project to sample:

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    swd = json.load(open(f"{folder}/swd_schedule.json"))
    image = pipe(prompt, sigmas=swd["sigmas"], height=swd["height"], width=swd["width"],
                 guidance_scale=0.0, max_sequence_length=swd["max_sequence_length"]).images[0]

A FLUX folder ships `pipeline.py` (`swd_core/flux_scalewise_pipeline.py`, self-contained), since
stock `FluxPipeline` samples one size; it loads with `custom_pipeline=folder, trust_remote_code=True`
(the code is the folder's own; see that file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import FlowMatchLCMScheduler
from peft.utils import get_peft_model_state_dict

from swd_core.adapters.flux import load_flux_pipeline
from swd_core.adapters.sd3 import SD3Adapter, load_sd3_pipeline
from swd_core.lora import STUDENT
from swd_core.schedules import ScaleSchedule

SCHEDULE_FILE = "swd_schedule.json"
FLUX_PIPELINE = Path(__file__).with_name("flux_scalewise_pipeline.py")


def export_lora(adapter: SD3Adapter, out_dir: str | Path, adapter_name: str = STUDENT) -> Path:
    """Save one adapter in diffusers' LoRA format (`pipe.load_lora_weights(out_dir)` reads it).

    Args:
        adapter (`FamilyAdapter`): the model whose transformer carries the adapter.
        out_dir (`str` or `Path`): the folder to write.
        adapter_name (`str`): the adapter, by default the student's.

    Returns:
        `Path`: `out_dir`.
    """
    out_dir = Path(out_dir)
    transformer = adapter.transformer
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    metadata = transformer.peft_config[adapter_name].to_dict()
    type(adapter.pipe).save_lora_weights(out_dir, transformer_lora_layers=state,
                                         transformer_lora_adapter_metadata=metadata)
    return out_dir


def schedule_record(schedule: ScaleSchedule, vae_scale_factor: int, max_sequence_length: int, **extra) -> dict:
    """What an export records of its sampling (`SCHEDULE_FILE`): scales, sigmas, sizes, text length,
    plus `extra` fields.

    Args:
        schedule (`ScaleSchedule`): the student's.
        vae_scale_factor (`int`): pixels per latent cell, for the image sizes.
        max_sequence_length (`int`): T5 tokens per prompt.
        extra: further JSON-serialisable fields (e.g. `family`, `guidance_scale`).

    Returns:
        `dict`: JSON-serialisable.
    """
    return {
        "scales": list(schedule.scales), "sigmas": list(schedule.sigmas),
        "boundaries": list(schedule.boundaries) if schedule.boundaries else None,
        "scale_factors": schedule.scale_factors(), "vae_scale_factor": vae_scale_factor,
        "height": schedule.scales[0] * vae_scale_factor, "width": schedule.scales[0] * vae_scale_factor,
        "output_size": schedule.final_scale * vae_scale_factor,
        "max_sequence_length": max_sequence_length, "guidance_scale": 0.0, **extra,
    }


def export_merged_pipeline(teacher_path: str, out_dir: str | Path, schedule: ScaleSchedule, *,
                           lora_dir: str | Path | None = None, transformer=None,
                           max_sequence_length: int = 256, dtype: str = "float32", family: str = "sd3",
                           guidance_scale: float = 0.0) -> Path:
    """Teacher pipeline + the student's weights (a LoRA folder to fuse, or a fully fine-tuned
    `transformer`), saved with `save_pretrained`: SD3 with a scale-wise `FlowMatchLCMScheduler`;
    FLUX with the scale-wise pipeline file and `guidance_scale`, the student's embedded guidance.

    Args:
        teacher_path (`str`): the teacher pipeline (folder, Hub id or `builtin:` spec).
        out_dir (`str` or `Path`): the folder to write.
        schedule (`ScaleSchedule`): the student's, recorded in `SCHEDULE_FILE`.
        lora_dir (`str` or `Path`, *optional*): a LoRA student (`export_lora`'s folder) to fuse.
        transformer (*optional*): a fully fine-tuned student transformer; exactly one of the two.
        max_sequence_length (`int`), dtype (`str`), family (`str`): the teacher's.
        guidance_scale (`float`): FLUX only, the guidance the student's embedding was trained at.

    Returns:
        `Path`: `out_dir`.
    """
    if (lora_dir is None) == (transformer is None):
        raise ValueError("export_merged_pipeline: pass exactly one of lora_dir (LoRA student) "
                         "or transformer (full fine-tune)")
    if family not in ("sd3", "flux"):
        raise ValueError(f"model family {family!r} cannot be exported; allowed: ['flux', 'sd3']")
    out_dir = Path(out_dir)
    pipe = load_sd3_pipeline(teacher_path, dtype) if family == "sd3" else load_flux_pipeline(teacher_path, dtype)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), adapter_name=STUDENT)
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
        pipe.unload_lora_weights()
    else:
        pipe.transformer = transformer
    if family == "sd3":
        pipe.scheduler = FlowMatchLCMScheduler(shift=1.0, scale_factors=schedule.scale_factors(),
                                               upscale_mode="bicubic")
    pipe.save_pretrained(out_dir)
    extra = {}
    if family == "flux":
        shutil.copyfile(FLUX_PIPELINE, out_dir / "pipeline.py")
        extra = {"guidance_scale": guidance_scale, "custom_pipeline": "pipeline.py"}
    record = schedule_record(schedule, pipe.vae_scale_factor, max_sequence_length, teacher=str(teacher_path),
                             family=family, **extra)
    (out_dir / SCHEDULE_FILE).write_text(json.dumps(record, indent=2))
    return out_dir


def read_schedule(folder: str | Path) -> dict:
    """The `schedule_record` of an exported student folder.

    Args:
        folder (`str` or `Path`): the exported student.

    Returns:
        `dict`

    Raises:
        FileNotFoundError: the folder is not an exported SwD student.
    """
    path = Path(folder) / SCHEDULE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an exported SwD student: {SCHEDULE_FILE} is missing")
    return json.loads(path.read_text())
