"""The pipeline definition: one typed schema for every stage.

Loaded from YAML by `load_pipeline_config`; an invalid file fails with `PipelineConfigError`,
whose message names each bad field, the value given and what is allowed. One module for the
whole definition (longer than the others): a reader finds every field, its default and its
checks in one place, in the order of the YAML's sections.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swd_core.lora import DEFAULT_TARGETS
from swd_core.loss_settings import MMD_KERNELS, LossSettings
from swd_core.schedules import GRID_STEPS, PRESETS, ScaleSchedule, family_sigma_grid, preset

# Patch size per model family, so schedules can be validated before any weights are loaded.
# FLUX packs 2×2 latent patches into a token, so its scales divide by 2 as well.
FAMILY_PATCH_SIZE = {"sd3": 2, "flux": 2}
Stage = Literal["synthesize", "precompute", "distill", "evaluate", "deploy", "preview"]
STAGES: tuple[str, ...] = get_args(Stage)


# Memory as a Kubernetes quantity ("48Gi", "512Mi", "141G"): rendered cluster manifests size
# their pods from it (pipelines/cluster/). The pattern stays in the JSON Schema for editors; the
# validator gives the message, which names the units instead of quoting the pattern.
MEMORY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"


def _memory_quantity(v: str) -> str:
    if not re.fullmatch(MEMORY_PATTERN, v):
        raise ValueError("not a Kubernetes memory quantity: a number and an optional unit, Ki Mi Gi Ti (powers of "
                         "1024) or k M G T (of 1000), e.g. 48Gi or 141G (not GB)")
    return v


Memory = Annotated[str, AfterValidator(_memory_quantity), Field(json_schema_extra={"pattern": MEMORY_PATTERN})]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Strict):
    """The teacher diffusion model that is distilled, and whose architecture the student shares."""

    path: str = Field(description="The teacher pipeline: a local diffusers folder, a Hugging Face Hub id "
                                  "(e.g. stabilityai/stable-diffusion-3.5-medium), `builtin:toy-sd3`, "
                                  "`builtin:tiny-sd3[?opts]` or `builtin:tiny-flux[?opts]`.")
    family: Literal["sd3", "flux"] = Field(
        "sd3", description="Model family (`sd3`: SD3 / SD3.5, `flux`: FLUX.1); it selects the adapter code, the "
                           "default patch size and the sigma grid of the schedule and the losses (docs/flux.md).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the teacher's weights are loaded in (the student and fake score share it).")
    max_sequence_length: Annotated[int, Field(ge=0, le=512)] = Field(
        256, description="T5 text tokens per prompt; 0: no T5 (CLIP tokens only, as in the toy).")
    patch_size: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Transformer patch size, for a custom transformer; null: the family's (2 for sd3). "
                          "Schedules' scales must divide by it.")

    @property
    def resolved_patch_size(self) -> int:
        return self.patch_size or FAMILY_PATCH_SIZE[self.family]

    @model_validator(mode="after")
    def _flux_needs_t5(self):
        if self.family == "flux" and self.max_sequence_length == 0:
            raise ValueError("teacher.max_sequence_length: FLUX's transformer reads T5 tokens only (CLIP gives the "
                             "pooled vector); give the T5 length, e.g. 512 for FLUX.1-dev")
        return self


class DataSource(Strict):
    """One input of the precompute stage (pipelines/sources.py).

    `parquet`: a Parquet file or folder (local or s3://) with image bytes and caption columns.
    `imagefolder`: a folder with image files and a `metadata.csv` (`file_name`, `caption`).
    `shapes`: the procedural toy dataset (swd_core.toy.shapes), `limit` rows from `seed`;
    `path` is only its label (e.g. "builtin:shapes").
    """

    path: str = Field(description="Where the rows are: a Parquet file or folder, an image folder (local or "
                                  "s3://), or a label such as `builtin:shapes` for the `shapes` format.")
    format: Literal["parquet", "imagefolder", "shapes"] = Field(
        "parquet", description="How `path` is read (see above).")
    image_column: str = Field("image", description="Parquet only: the column with image bytes (or a Hugging Face "
                                                   "`{bytes, path}` struct).")
    caption_column: str = Field("caption", description="Parquet only: the column with the caption text.")
    limit: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Read at most this many rows; null: all. Required for `shapes` (the rows to generate).")
    seed: int = Field(0, description="`shapes` only: the seed of the generated rows.")
    long_captions: Literal["truncate", "quarantine"] = Field(
        default="truncate",
        description="A caption longer than the text encoders' window: `truncate` keeps the row and the encoders "
                    "see the caption's first tokens (as diffusers and the SwD authors' code do; counted in the "
                    "summary), `quarantine` refuses it as caption_too_long.")

    @model_validator(mode="after")
    def _shapes_needs_limit(self):
        if self.format == "shapes" and self.limit is None:
            raise ValueError("a `shapes` source needs `limit` (how many rows to generate)")
        return self


class DataConfig(Strict):
    """Training data, and the prompts of the synthesize, evaluate and preview stages."""

    sources: list[DataSource] = Field([], description="The (image, caption) inputs of the precompute stage.")
    prompts: str | None = Field(
        None, description="Prompts the synthesize stage turns into teacher images: a text file (one prompt per "
                          "line) or Parquet with a `prompt` column, local or s3://.")
    eval_prompts: str | None = Field(
        None, description="Held-out prompts of the evaluate stage and the retrain gate outside the shapes domain "
                          "(same formats as `prompts`; Parquet with an `image` column beside `prompt` also gives "
                          "`fd_dinov2` against those images), or `builtin:parti` (PartiPrompts; "
                          "`builtin:parti?category=animals,vehicles&challenge=basic` selects); "
                          "null: `preview_prompts`.")
    preview_prompts: list[str] = Field(["a photo"], description="Prompts of the preview stage and of the sample grid "
                                                                "written with each export.")

    @field_validator("prompts", "eval_prompts")
    @classmethod
    def _builtin_set(cls, v: str | None):
        if v is not None and v.startswith("builtin:"):
            from pipelines.prompt_sets import builtin_prompts

            builtin_prompts(v)  # unknown sets, options and categories fail here, before anything runs
        return v


class SynthesizeConfig(Strict):
    """The optional synthesize stage (docs/precompute.md): teacher images for `data.prompts`,
    read by precompute as one more source."""

    enabled: bool = Field(
        False, description="Run the stage when it is in `stages`, and read its output in precompute.")
    num_steps: Annotated[int, Field(ge=1, le=1000)] = Field(
        28, description="Teacher sampling steps (Euler) per image.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.0, description="Classifier-free guidance scale of the teacher's samples (1: no guidance).")
    seed: int = Field(0, description="Prompt i is sampled with seed `seed + i`, whatever the batch or actor.")
    batch_size: Annotated[int, Field(ge=1)] = Field(8, description="Prompts per teacher call on one actor.")
    actors: Annotated[int, Field(ge=1)] = Field(
        1, description="Ray Data actors, each holding a full teacher pipeline.")
    cpus_per_actor: Annotated[float, Field(ge=0)] = Field(1.0, description="CPUs reserved per actor.")
    gpus_per_actor: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs reserved per actor (fractions allowed).")
    memory_per_actor: Memory | None = Field(
        None, description="Memory per actor as a Kubernetes quantity (e.g. `48Gi`), used to size cluster pods; "
                          "null: the renderer's default.")
    output: str | None = Field(None, description="Output folder (local or s3://); null: `<run_dir>/synthesized`.")


class PrecomputeConfig(Strict):
    """The precompute stage (docs/precompute.md): text embeddings and VAE latents at every scale of
    the schedule, written to the store distillation reads."""

    batch_size: Annotated[int, Field(ge=1)] = Field(16, description="Rows per encoder call on one actor.")
    actors: Annotated[int, Field(ge=1)] = Field(
        1, description="Ray Data actors, each holding the text encoders and the VAE.")
    cpus_per_actor: Annotated[float, Field(ge=0)] = Field(1.0, description="CPUs reserved per actor.")
    gpus_per_actor: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs reserved per actor (fractions allowed).")
    memory_per_actor: Memory | None = Field(
        None, description="Memory per actor as a Kubernetes quantity (e.g. `16Gi`), used to size cluster pods; "
                          "null: the renderer's default.")
    storage_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Dtype of the stored embeddings and latents.")
    output: str | None = Field(None, description="The store's folder (local or s3://); null: `<run_dir>/store`.")


class ScheduleConfig(Strict):
    """Either a `preset` or explicit `scales` with `boundaries` (grid indices) or `sigmas`."""

    preset: str | None = Field(None, description="A named schedule from swd_core.schedules (e.g. `sd35_medium_6step`, "
                                                 "`toy_4step`); null: explicit `scales`.")
    scales: list[int] | None = Field(
        None, description="Latent side per sampling step, increasing (e.g. [32, 48, 64, 80, 96, 128]).")
    boundaries: list[int] | None = Field(
        None, description="Per step, its index into the teacher family's 28-step sigma grid (0 = sigma 1.0); "
                          "one per scale.")
    sigmas: list[float] | None = Field(
        None, description="Per step, its noise level in (0, 1], decreasing; one per scale.")
    scalewise: bool = Field(True, description="false: the full-resolution baseline, every step at the last scale "
                                              "with the same sigmas.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v):
        if v is not None and v not in PRESETS:
            close = difflib.get_close_matches(v, PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown schedule preset {v!r}{hint}; allowed: {sorted(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if self.preset is None and self.scales is None:
            raise ValueError("give either `preset` or `scales` (with `boundaries` or `sigmas`)")
        if self.preset is not None and (self.scales or self.boundaries or self.sigmas):
            raise ValueError("give either `preset` or explicit `scales`/`boundaries`/`sigmas`, not both")
        if self.scales is not None and (self.boundaries is None) == (self.sigmas is None):
            raise ValueError("with explicit `scales`, give exactly one of `boundaries` (grid indices) or `sigmas`")
        self.build()  # ordering and one-sigma-per-scale checks, reported at this field
        return self

    def build(self, patch_size: int | None = None, family: str = "sd3") -> ScaleSchedule:
        """The schedule; `boundaries` index the family's sigma grid (`swd_core.schedules.family_sigma_grid`)."""
        scales = PRESETS[self.preset]["scales"] if self.preset is not None else self.scales
        grid = None if family == "sd3" else family_sigma_grid(family, scales[-1], patch_size or 2)
        if self.preset is not None:
            schedule = preset(self.preset, patch_size, grid)
        elif self.boundaries is not None:
            schedule = ScaleSchedule.from_boundaries(self.scales, self.boundaries, patch_size, grid)
        else:
            schedule = ScaleSchedule(tuple(self.scales), tuple(self.sigmas), None, patch_size)
        return schedule if self.scalewise else schedule.full_resolution()


def _check_grid_range(v: tuple[int, int]) -> tuple[int, int]:
    lo, hi = v
    if not 0 <= lo < hi <= GRID_STEPS:
        raise ValueError(f"grid_range must be [low, high) indices into the {GRID_STEPS}-step sigma grid, "
                         f"0 <= low < high <= {GRID_STEPS}")
    return v


GridRange = Annotated[tuple[int, int], AfterValidator(_check_grid_range)]
LOSS = LossSettings()  # the algorithm's defaults (swd_core): the loss sections offer them


class MMDLoss(Strict):
    """The MMD term: the student's and the real images' transformer features at a shared noise level."""

    weight: Annotated[float, Field(ge=0)] = Field(
        LOSS.mmd_weight, description="Weight of the term in the generator loss; 0: off.")
    kernel: Literal[MMD_KERNELS] = Field(
        LOSS.mmd_kernel, description="`linear`: a pseudo-Huber distance between mean features; `rbf`: token-level "
                                     "MMD² with a Gaussian kernel.")
    c: Annotated[float, Field(gt=0)] = Field(LOSS.mmd_c, description="`linear` only: the pseudo-Huber constant.")
    rbf_bandwidth: Annotated[float, Field(gt=0)] = Field(
        LOSS.rbf_bandwidth, description="`rbf` only: the kernel bandwidth h.")
    grid_range: GridRange = Field(
        LOSS.mmd_range, description="[low, high) indices into the 28-step sigma grid where the noise level is "
                                    "drawn; the default, sigma <= 0.602, compares fine detail.")


class DMDLoss(Strict):
    """The distribution-matching (DMD) term: the teacher's guided score against the fake score."""

    weight: Annotated[float, Field(ge=0)] = Field(
        LOSS.dmd_weight, description="Weight of the term in the generator loss; 0: off.")
    guidance_scale: Annotated[float, Field(ge=0)] = Field(
        LOSS.guidance_scale, description="Classifier-free guidance scale of the teacher's score (1: no guidance).")
    grid_range: GridRange = Field(
        LOSS.dmd_range, description="[low, high) indices into the 28-step sigma grid where the noise level is drawn.")
    min_scale: Annotated[int, Field(ge=0)] = Field(
        LOSS.dmd_min_scale, description="DMD only at scales (latent side) >= this, for a teacher whose scores at "
                                        "small scales are off its training distribution; 0: every scale (the paper).")


class GANLoss(Strict):
    """The GAN term: a head on the fake score's features tells real from generated images."""

    weight: Annotated[float, Field(ge=0)] = Field(
        LOSS.gan_weight, description="Weight of the generator's GAN term; 0: off.")
    discriminator_weight: Annotated[float, Field(ge=0)] = Field(
        LOSS.discriminator_weight, description="Weight of the discriminator loss in the fake-score update.")


class LossesConfig(Strict):
    """The generator loss: weight·MMD + weight·DMD + weight·GAN (at least one weight above 0)."""

    mmd: MMDLoss = Field(MMDLoss(), description="The MMD term.")
    dmd: DMDLoss = Field(DMDLoss(), description="The DMD term.")
    gan: GANLoss = Field(GANLoss(), description="The GAN term.")
    feature_block: Annotated[int, Field(ge=0)] = Field(
        LOSS.feature_block, description="0-based transformer block whose image tokens feed MMD and the GAN head.")

    @model_validator(mode="after")
    def _valid_settings(self):
        self.settings()  # LossSettings' own checks (at least one weight above 0)
        return self

    def settings(self, grid: tuple[float, ...] | None = None) -> LossSettings:
        """The section as the algorithm takes it; `grid`: the run's sigma grid the ranges index."""
        m, d, g = self.mmd, self.dmd, self.gan
        return LossSettings(
            feature_block=self.feature_block,
            mmd_weight=m.weight, mmd_kernel=m.kernel, mmd_c=m.c, rbf_bandwidth=m.rbf_bandwidth,
            mmd_range=tuple(m.grid_range),
            dmd_weight=d.weight, guidance_scale=d.guidance_scale, dmd_range=tuple(d.grid_range),
            dmd_min_scale=d.min_scale,
            gan_weight=g.weight, discriminator_weight=g.discriminator_weight,
            grid=grid)


class LoRAConfig(Strict):
    """The LoRA adapters of the student and the fake score (`distill.mode: lora`)."""

    rank: Annotated[int, Field(ge=1)] = Field(64, description="LoRA rank of both adapters.")
    alpha: Annotated[float, Field(gt=0)] | None = Field(
        None, description="LoRA alpha (scale alpha/rank); null: = rank.")
    targets: list[str] = Field(list(DEFAULT_TARGETS), description="Names of the transformer's linear layers that "
                                                                  "get adapters.")


class ValidationConfig(Strict):
    """Choosing the exported student by a held-out score (early stopping): at every checkpoint the
    student samples `num_prompts` validation prompts, disjoint from the evaluate stage's, and the
    export in <run_dir>/student is replaced only when `metric` improves. Shapes domain only: it
    is the domain with a scorer. 0 prompts: off, the last step is exported."""

    num_prompts: Annotated[int, Field(ge=0, le=640)] = Field(
        0, description="Validation prompts per checkpoint, divisible by `resources.num_workers`; 0: off (the "
                       "last step is exported).")
    metric: Literal["fd", "prompt_accuracy"] = Field(
        "fd", description="The score that chooses the export: `fd` (Fréchet distance, lower is better) or "
                          "`prompt_accuracy` (higher is better).")
    batch_size: Annotated[int, Field(ge=1)] = Field(
        64, description="Validation images sampled per call on one worker.")

    @field_validator("num_prompts")
    @classmethod
    def _enough_for_a_distance(cls, v: int):
        if v == 1:
            raise ValueError("validation.num_prompts: the Fréchet distance needs at least 2 images "
                             "(0 turns validation off)")
        return v

    @property
    def score_key(self) -> str:
        """The reported metric the choice follows (also Ray's checkpoint score attribute)."""
        return f"val_{self.metric}"

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric == "fd" else "max"


class DistillConfig(Strict):
    """The distill stage (docs/distill.md): Ray Train workers with DeepSpeed train the student to
    sample the schedule's scales; the result is exported to `<run_dir>/student`."""

    schedule: ScheduleConfig = Field(description="The student's sampling schedule: scales and noise levels.")
    losses: LossesConfig = Field(LossesConfig(), description="The generator loss.")
    mode: Literal["lora", "full"] = Field(
        "lora", description="`lora`: student and fake score are LoRA adapters on the shared teacher weights; "
                            "`full`: the student is a full copy of the transformer.")
    lora: LoRAConfig = Field(LoRAConfig(), description="The adapters (both modes: in `full` mode the fake score "
                                                       "is still a LoRA adapter).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (0: plain data parallel).")
    batch_size: Annotated[int, Field(ge=1)] = Field(64, description="Global batch: images per generator step summed "
                                                                    "over all workers.")
    steps: Annotated[int, Field(ge=1)] = Field(
        3000, description="Training steps in all, each `fake_updates` fake-score updates and one generator "
                          "update; a multiple of the schedule's step count.")
    lr: Annotated[float, Field(gt=0)] = Field(5e-6, description="AdamW learning rate of the student.")
    fake_lr: Annotated[float, Field(gt=0)] | None = Field(
        None, description="AdamW learning rate of the fake score and the GAN head; null: = `lr`.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(1e-2, description="AdamW weight decay of both optimizers.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2) of both optimizers.")
    grad_clip: Annotated[float, Field(gt=0)] = Field(10.0, description="Gradient-norm clipping threshold.")
    lr_decay_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="The last fraction of `steps` over which both learning rates fall linearly to 0; "
                         "0: constant (the paper).")
    fake_updates: Annotated[int, Field(ge=0)] = Field(
        5, description="Fake-score updates before each generator update.")
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Decay of an exponential moving average of the student's weights (diffusers' EMAModel, "
                         "warm-up n/(9+n)); the export and evaluation use the average. 0: off.")
    checkpoint_every: Annotated[int, Field(ge=1)] = Field(
        240, description="Steps between checkpoints (and validations); a multiple of the schedule's step count, so "
                         "each follows a full round of scales (240 divides by 2, 3, 4, 5, 6 and 8).")
    shuffle_window: Annotated[int, Field(ge=0)] = Field(
        1024, description="Rows are shuffled per epoch within windows of this many rows of each worker's range, "
                          "seeded by `seed` and the epoch; 0: file order. A worker holds one window of decoded rows "
                          "in memory.")
    keep_checkpoints: Annotated[int, Field(ge=1)] = Field(
        2, description="Checkpoints kept; with validation on, the best scored ones (Ray also keeps the latest).")
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        2, description="Worker failures to recover from by restarting at the last checkpoint; -1: unlimited.")
    log_every: Annotated[int, Field(ge=1)] = Field(
        10, description="Steps between progress lines and between the metrics rank 0 reports and tracks.")
    export_at_checkpoints: bool = Field(
        False, description="Also export the student (LoRA and merged) at each checkpoint, not only at the end.")
    validation: ValidationConfig = Field(ValidationConfig(), description="Choosing the export by a held-out score.")
    seed: int = Field(0, description="Seed of the training noise, the data order and the adapters' initialisation.")

    @model_validator(mode="after")
    def _in_phase(self):
        n = self.schedule.build().num_steps
        for name in ("checkpoint_every", "steps"):
            value = getattr(self, name)
            if value % n:
                low, high = max(n, value - value % n), value - value % n + n
                options = f"{low} or {high}" if low != high else f"{high}"
                raise ValueError(f"{name} {value} is not a multiple of the schedule's {n} steps: checkpoints "
                                 f"and validation must follow a full round of scales (use {options})")
        return self

    @model_validator(mode="after")
    def _ema_needs_whole_weights(self):
        if self.ema_decay > 0 and self.mode == "full" and self.zero_stage == 3:
            raise ValueError("distill.ema_decay averages whole student weights on every worker; ZeRO-3 shards "
                             "them (mode: full, zero_stage: 3). Use zero_stage <= 2, LoRA mode, or ema_decay: 0")
        return self


ImageMetric = Literal["clip_score", "pickscore", "fd_dinov2"]


class MetricModels(Strict):
    """The pretrained models of the image metrics: Hub ids (downloaded once into the Hugging Face
    cache, as the teacher is) or local folders (docs/evaluate.md gives each one's licence)."""

    clip: str = Field("openai/clip-vit-large-patch14", description="The CLIP checkpoint of `clip_score` (any "
                                                                     "CLIPModel with its processor).")
    pickscore: str = Field("yuvalkirstain/PickScore_v1", description="The PickScore model (a CLIPModel).")
    pickscore_processor: str = Field("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                     description="The processor PickScore is used with (its base CLIP-H's).")
    dinov2: str = Field(
        "facebook/dinov2-large", description="The DINOv2 checkpoint of `fd_dinov2`, with its image processor.")


class EvaluateConfig(Strict):
    """The evaluate stage (pipelines/stages/evaluate.py, docs/evaluate.md): the teacher with CFG,
    the teacher at the student's step count without CFG, and the exported student, on the same
    held-out prompts and seeds. The few-step models share `num_prompts` so their accuracy and FD
    compare like for like; the CFG teacher is the expensive one and gets its own count."""

    num_prompts: Annotated[int, Field(ge=2)] = Field(
        64, description="Held-out prompts of the few-step models (the teacher at the student's step count, "
                        "and the student).")
    teacher_num_prompts: Annotated[int, Field(ge=2)] | None = Field(
        None, description="Held-out prompts of the guided (CFG) teacher; null: `num_prompts`.")
    seed: int = Field(0, description="Image i uses seed `seed + i` in every model.")
    teacher_steps: Annotated[int, Field(ge=1)] = Field(28, description="Sampling steps of the guided teacher.")
    teacher_guidance_scale: Annotated[float, Field(ge=0)] = Field(
        7.0, description="Classifier-free guidance scale of the guided teacher (1: no guidance).")
    student: str | None = Field(
        None, description="The exported student folder to evaluate (local or s3://); "
                          "null: `<run_dir>/student/merged`.")
    domain: Literal["auto", "shapes", "prompts"] = Field(
        "auto", description="`shapes`: prompt accuracy and FD with the shapes scorer; `prompts`: prompt-free metrics; "
                            "`auto`: shapes for the toy teacher or shapes data, else prompts.")
    batch_size: Annotated[int, Field(ge=1)] = Field(64, description="Images sampled per call.")
    latency_repeats: Annotated[int, Field(ge=1)] = Field(
        5, description="Timed single-image calls per model; the median is reported.")
    grid_prompts: Annotated[int, Field(ge=1)] = Field(8, description="Rows (prompts) of the comparison image grid.")
    cpus: Annotated[float, Field(ge=0, description="CPUs the evaluate task reserves (it runs as one Ray task, "
                                 "not in the driver); the preview stage runs with the same resources.")] = 1.0
    gpus: Annotated[float, Field(ge=0, description="GPUs the evaluate (and preview) task reserves; > 0 runs the "
                                 "teacher and the student on CUDA, fractions share a GPU.")] = 0.0
    memory: Memory | None = Field(None, description="Memory the evaluate task needs on its pod, e.g. 40Gi "
                                  "(sizes the rendered cluster's pods).")
    metrics: list[ImageMetric] = Field(
        [], description="Image metrics of every model, for any teacher: "
                        "`clip_score` (CLIP image-prompt similarity), "
                        "`pickscore` (PickScore v1, a human-preference model), "
                        "`fd_dinov2` (Fréchet distance of DINOv2 features to the guided teacher's images "
                        "of the same prompts and seeds, and to the prompts' own images where the prompt source "
                        "holds them); each with a bootstrap interval over prompts.")
    metric_models: MetricModels = Field(MetricModels(), description="Where the metrics' models are.")
    metric_batch_size: Annotated[int, Field(ge=1)] = Field(32, description="Images per call of a metric model.")
    bootstrap_resamples: Annotated[int, Field(ge=100)] = Field(
        1000, description="Resamples of the prompts behind every interval of the image metrics.")
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = Field(0.95, description="Level of the intervals.")


class ServeConfig(Strict):
    """The deploy stage's Ray Serve application (pipelines/serve). `model` defaults to the distill
    stage's export, `<run_dir>/student/merged`; changing it on a running app hot-swaps the model."""

    model: str | None = Field(
        None, description="The exported student folder to serve: a local path or s3:// prefix; null: "
                          "`<run_dir>/student/merged`.")
    model_id: str | None = Field(None, description="The model name the API reports and accepts; null: `<name>-swd`.")
    app_name: str | None = Field(None, description="The Ray Serve application name; null: `swd-<name>`.")
    route_prefix: str = Field("/", description="HTTP path prefix of the application; starts with `/`.")
    host: str | None = Field(
        None, description="Address Serve's HTTP proxy listens on; null: 127.0.0.1 (this machine only), or 0.0.0.0 "
                          "(every interface) when an API key is configured. A public address without a key is "
                          "allowed, with a warning at deploy time.")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(8000, description="Port Serve's HTTP proxy listens on.")
    replicas: Annotated[int, Field(ge=1)] = Field(1, description="Generator replicas when not autoscaling.")
    cpus_per_replica: Annotated[float, Field(ge=0)] = Field(1.0, description="CPUs reserved per generator replica.")
    gpus_per_replica: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs reserved per generator replica (fractions allowed).")
    memory_per_replica: Memory | None = Field(
        None, description="Memory per replica as a Kubernetes quantity (e.g. `24Gi`), used to size cluster pods; "
                          "null: the renderer's default.")
    max_ongoing_requests: Annotated[int, Field(ge=1)] = Field(
        16, description="Requests in progress per generator replica; at least `max_batch_size`.")
    max_queued_requests: Annotated[int, Field(ge=1)] = Field(
        64, description="Requests waiting for a replica; beyond this a request gets an immediate 503.")
    max_batch_size: Annotated[int, Field(ge=1)] = Field(8, description="Requests sampled together in one batch.")
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = Field(
        0.05, description="Seconds a batch waits to fill before it is sampled.")
    min_replicas: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Autoscaling lower bound; set with `max_replicas` (both null: a fixed `replicas`).")
    max_replicas: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Autoscaling upper bound; set with `min_replicas`.")
    target_ongoing_requests: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Autoscaling target of requests in progress per replica; null: `max_batch_size`.")
    max_images: Annotated[int, Field(ge=1, le=64)] = Field(
        4, description="The largest `n` (images) one request may ask for.")
    max_prompt_chars: Annotated[int, Field(ge=1)] = Field(
        1000, description="The longest prompt accepted, in characters.")
    api_key_env: str | None = Field(
        None, description="Bearer-token auth: the key is read from this environment variable on each replica; "
                          "null with `api_key_file` null: no auth.")
    api_key_file: str | None = Field(
        None, description="Bearer-token auth: the key is read from this file on each replica (re-read on rotation); "
                          "at most one of this and `api_key_env`.")
    deterministic_batching: bool = Field(
        default=False,
        description="Pad every batch to max_batch_size rows. Kernels choose their algorithm by batch size, so "
                    "only a fixed batch shape makes a request's pixels bit-identical whether it was sampled alone "
                    "or with others; the price is max_batch_size images of compute for every batch, however "
                    "few requests it holds. Off: a batch is computed at the size that arrived.")

    @property
    def listen_host(self) -> str:
        """The address in effect: what `host` says, else loopback unless requests need a key."""
        if self.host is not None:
            return self.host
        return "0.0.0.0" if (self.api_key_env or self.api_key_file) else "127.0.0.1"

    def exposure_warning(self) -> str | None:
        """A line for the deployer when any machine that reaches the port can generate, with no key."""
        import ipaddress

        if self.api_key_env or self.api_key_file or self.listen_host == "localhost":
            return None
        try:
            if ipaddress.ip_address(self.listen_host).is_loopback:
                return None
        except ValueError:
            pass  # a host name: it may resolve to a public address
        return (f"warning: serve.host {self.listen_host} accepts connections from other machines and no API key "
                "is set: anyone who reaches the port can generate images (set serve.api_key_env or "
                "serve.api_key_file, or serve.host 127.0.0.1)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas "
                             "(or neither, for a fixed `replicas`)")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give at most one of api_key_env and api_key_file")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix {self.route_prefix!r} must start with '/'")
        return self


class S3Config(Strict):
    """Where s3:// paths are served from; credentials come from the standard AWS variables or files."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint (e.g. a MinIO URL); null: the standard AWS variables and config.")
    region: str | None = Field(None, description="S3 region; null: the standard AWS variables and config.")
    timeout_s: Annotated[float, Field(gt=0)] = Field(
        60.0, description="Seconds a request may wait to connect, and then for each read of its answer, before it "
                          "fails; a failed request is tried 5 times in all, so a stalled endpoint ends a read "
                          "within about 5 × this.")


class ResourcesConfig(Strict):
    """The distill stage's Ray Train workers, and where every stage's outputs are stored."""

    num_workers: Annotated[int, Field(ge=1)] = Field(1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: Annotated[float, Field(gt=0)] = Field(1.0, description="CPUs reserved per worker.")
    gpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        0.0, description="GPUs per worker; above 0, training runs on GPUs with NCCL.")
    memory_per_worker: Memory | None = Field(
        None, description="Memory per worker as a Kubernetes quantity (e.g. `48Gi`), used to size cluster pods; "
                          "null: the renderer's default.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the workers.")
    storage: str = Field("runs", description="Root of every run's outputs, a local directory or s3://bucket/prefix; "
                                             "a run's are under `<storage>/<name>` (`<run_dir>`).")
    s3: S3Config = Field(S3Config(), description="S3 settings for s3:// paths.")

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, v: str):
        if "://" in v and not v.startswith("s3://"):
            raise ValueError(f"storage {v!r}: only local paths and s3:// URIs are supported")
        return v


class GateMetric(Strict):
    """One metric of the promotion gate. The candidate passes it when it beats the champion by at
    least `min_margin` in the metric's `direction` (an absolute difference); a negative margin is
    a tolerance: the candidate may be that much worse."""

    name: Literal["teacher_denoise", "teacher_fd", "teacher_alignment", "teacher_cfg_denoise", "fd",
                  "prompt_accuracy", "clip_score", "pickscore", "fd_dinov2"] = Field(
        "teacher_denoise", description="The metric (docs/retrain.md); "
                                       "`fd` and `prompt_accuracy` need the shapes domain; "
                                       "`clip_score`, `pickscore` and `fd_dinov2` (to the teacher's images) read "
                                       "`evaluate.metric_models`.")
    direction: Literal["min", "max"] | None = Field(
        None, description="Which way is better; null: the metric's own (max for prompt_accuracy, teacher_alignment, "
                          "clip_score and pickscore, else min).")
    min_margin: float = Field(0.0, description="How much better than the champion the candidate must be, in the "
                                               "metric's units: the lower end of the interval of that gain must reach "
                                               "it; negative: a tolerance.")

    @property
    def resolved_direction(self) -> Literal["min", "max"]:
        higher = ("prompt_accuracy", "teacher_alignment", "clip_score", "pickscore")
        return self.direction or ("max" if self.name in higher else "min")


class GateConfig(Strict):
    """The promotion gate: candidate and champion sample the same held-out prompts (the evaluate
    stage's) with the same seeds, `seed + i` for prompt i, and are scored with `metrics`; every
    metric must pass, judged on the paired difference's bootstrap interval over prompts.
    The teacher metrics need only the teacher (swd_core.teacher_metrics); fd and prompt_accuracy
    need the shapes domain's scorer; clip_score, pickscore and fd_dinov2 their pretrained models."""

    # docs/retrain.md says how far the teacher-only metrics agree with the toy's
    metrics: Annotated[list[GateMetric], Field(min_length=1)] | None = Field(
        None, description="The metrics that must all pass; "
                          "null: `fd` in the shapes domain, else `teacher_cfg_denoise`.")
    num_prompts: Annotated[int, Field(ge=2)] = Field(64, description="Held-out prompts both models sample.")
    seed: int = Field(0, description="Prompt i uses seed `seed + i` in both models.")
    sigma: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="The fixed noise level in (0, 1) at which the teacher metrics read the samples.")
    reencode: bool = Field(
        True, description="The teacher metrics read each sample decoded and encoded again by the teacher's VAE (the "
                          "image a user gets); false: the sampler's latents, including what the decoder discards.")
    alignment_sigmas: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default=[0.3, 0.45, 0.6, 0.75], min_length=1,
        description="Noise levels that teacher_alignment averages over (its noise is the one of teacher_denoise).")
    cfg_denoise_sigmas: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default=[0.3, 0.45], min_length=1,
        description="Noise levels that teacher_cfg_denoise averages over; its CFG scale is teacher_guidance_scale.")
    block: Annotated[int, Field(ge=0)] | None = Field(
        None, description="0-based teacher block whose features `teacher_fd` compares; null: the middle block.")
    teacher_steps: Annotated[int, Field(ge=1)] = Field(
        28, description="Sampling steps of the teacher's reference images for `teacher_fd`.")
    teacher_guidance_scale: Annotated[float, Field(ge=0)] = Field(
        4.5, description="Classifier-free guidance scale of the teacher's reference images for `teacher_fd` "
                         "(1: no guidance).")
    batch_size: Annotated[int, Field(ge=1)] = Field(32, description="Images sampled or scored per call.")
    grid_prompts: Annotated[int, Field(ge=1)] = Field(
        6, description="Rows (prompts) of the candidate-vs-champion image grid.")
    bootstrap_resamples: Annotated[int, Field(ge=100)] = Field(
        1000, description="Resamples of the prompts behind the interval of each candidate - champion difference.")
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = Field(
        0.95, description="Level of those intervals; a metric passes when the interval's end on the worse side clears "
                          "`min_margin` (0.95: the candidate is that much better with 97.5% one-sided confidence).")


class RegistryConfig(Strict):
    """MLflow tracking and model registry. Default: a SQLite file under the run's storage (local
    storage only); on a cluster a tracking server, here or in MLFLOW_TRACKING_URI."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; "
                          "null: MLFLOW_TRACKING_URI, else a SQLite file under the run's storage.")
    model_name: str | None = Field(None, description="The registered model's name; null: the definition's `name`.")


class TrackingConfig(Strict):
    """Run tracking in MLflow (docs/tracking.md): every distill run is an MLflow run holding the
    definition, per-step metrics, validation scores, samples, curves and the evaluation report."""

    enabled: bool = Field(True, description="Track the run in MLflow; false: no MLflow run.")
    uri: str | None = Field(
        None, description="MLflow tracking URI (a server, or sqlite:///file); null: MLFLOW_TRACKING_URI, else the "
                          "SQLite file `mlflow.db` in the run's folder (local storage only). A server that does not "
                          "answer at the start falls back to that file.")
    experiment: str | None = Field(None, description="The MLflow experiment; null: the definition's `name`.")


class RetrainConfig(Strict):
    """Scheduled retraining (pipelines/retrain.py, docs/retrain.md): on each cron tick one cycle
    encodes the new rows of `data.sources` into the shared store, trains the champion
    `steps` more steps, scores candidate and champion with the gate, and promotes the
    candidate only when it passes."""

    schedule: str = Field(
        "0 3 * * *", description="When cycles run: a 5-field cron expression (minute hour day-of-month month "
                                 "day-of-week), as KubeRay's RayCronJob and Kubernetes' CronJob read it.")
    timezone: str = Field("UTC", description="IANA time zone of `schedule`, e.g. Europe/Berlin.")
    steps: Annotated[int, Field(ge=1)] = Field(
        240, description="Training steps per cycle (as in `distill.steps`), on top of the champion's; a multiple of "
                         "the schedule's step count.")
    warm_start: bool = Field(
        True, description="Start from the champion's checkpoint (adapters, GAN head, optimizer state, EMA); "
                          "false: from the teacher.")
    min_new_rows: Annotated[int, Field(ge=0)] = Field(
        1, description="A cycle that finds fewer new rows than this in `data.sources` changes nothing; "
                       "0: train anyway.")
    gate: GateConfig = Field(GateConfig(), description="The promotion gate.")
    registry: RegistryConfig = Field(RegistryConfig(), description="MLflow tracking and model registry.")
    serve: bool = Field(
        True, description="The cycle deploys the champion (the first time) or hot-swaps the running app to it.")
    lock_ttl_s: Annotated[float, Field(ge=5)] = Field(
        60.0, description="Seconds after which a dead cycle's lock on the definition expires.")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str):
        from croniter import croniter

        fields = v.split()
        if len(fields) != 5 or v.startswith("@"):
            raise ValueError(f"the schedule must be a 5-field cron expression (minute hour day-of-month month "
                             f"day-of-week), as KubeRay and Kubernetes accept it; got {len(fields)} field(s)")
        if not croniter.is_valid(v):
            raise ValueError("not a valid cron expression (minute hour day-of-month month day-of-week)")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str):
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as UTC or Europe/Berlin") from None
        return v


# --- the cluster section: what a Kubernetes or launcher deployment needs beyond the stages ---------

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
# the images KubeRay's docs start from: Ray alone, without this project (the entrypoint's import fails)
STOCK_RAY_IMAGES = ("rayproject/ray", "rayproject/ray-ml")


def _dns_label(v: str) -> str:
    if len(v) > 63 or not re.fullmatch(DNS_LABEL, v):
        raise ValueError("not a DNS-1123 label (a Kubernetes namespace): lower-case letters, digits and '-', "
                         "starting and ending with a letter or digit, at most 63 characters")
    return v


def _dns_subdomain(v: str) -> str:
    if len(v) > 253 or not re.fullmatch(DNS_SUBDOMAIN, v):
        raise ValueError("not a DNS-1123 subdomain (a Kubernetes object name): lower-case letters, digits, '-' and "
                         "'.', starting and ending with a letter or digit, at most 253 characters")
    return v


def _qualified_name(v: str, what: str = "label key") -> str:
    prefix, _, name = v.rpartition("/")
    if (prefix and (len(prefix) > 253 or not re.fullmatch(DNS_SUBDOMAIN, prefix))) or len(name) > 63 \
            or not re.fullmatch(_LABEL_NAME, name):
        raise ValueError(f"not a Kubernetes {what}: an optional DNS-subdomain prefix and '/', then at most 63 "
                         "letters, digits, '-', '_' or '.', starting and ending with a letter or digit")
    return v


def _label_value(v: str) -> str:
    if len(v) > 63 or (v and not re.fullmatch(_LABEL_NAME, v)):
        raise ValueError("not a Kubernetes label value: at most 63 letters, digits, '-', '_' or '.', starting and "
                         "ending with a letter or digit")
    return v


def _extended_resource(v: str) -> str:
    _qualified_name(v, "resource name")
    if "/" not in v or v in ("nvidia.com/gpu",) or v.split("/")[0].endswith("kubernetes.io"):
        raise ValueError("an extra resource is an extended resource with a domain, e.g. vpc.amazonaws.com/efa or "
                         "rdma/ib; cpu, memory and nvidia.com/gpu come from the definition's sizing")
    return v


def _project_image(v: str) -> str:
    if not v or any(c.isspace() for c in v):
        raise ValueError("not a container image reference")
    repository = v.split("@")[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    if repository.removeprefix("docker.io/").removeprefix("index.docker.io/") in STOCK_RAY_IMAGES:
        raise ValueError("a stock Ray image does not hold this project (the job's first import fails): build "
                         "cluster/Dockerfile (`make image`), push it, and name that image")
    return v


DnsLabel = Annotated[str, AfterValidator(_dns_label), Field(json_schema_extra={"pattern": DNS_LABEL, "maxLength": 63})]
DnsName = Annotated[str, AfterValidator(_dns_subdomain),
                    Field(json_schema_extra={"pattern": DNS_SUBDOMAIN, "maxLength": 253})]
LabelKey = Annotated[str, AfterValidator(_qualified_name)]
LabelValue = Annotated[str, AfterValidator(_label_value)]
ResourceName = Annotated[str, AfterValidator(_extended_resource)]
Seconds = Annotated[int, Field(ge=1)]


class Toleration(Strict):
    """A Kubernetes toleration (core/v1 Toleration) of a taint on the GPU nodes, e.g. `{key:
    nvidia.com/gpu, operator: Exists, effect: NoSchedule}` for the taint GPU node pools usually carry."""

    key: LabelKey | None = Field(None, description="The taint's key; null with `operator: Exists`: every taint.")
    operator: Literal["Equal", "Exists"] = Field(
        "Equal", description="`Equal`: key and value match; `Exists`: the key does.")
    value: LabelValue | None = Field(None, description="The taint's value (`Equal` only).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="The taint effect tolerated; null: every effect.")
    tolerationSeconds: Seconds | None = Field(  # noqa: N815 - Kubernetes' own field name
        None, description="`NoExecute` only: how long the pod stays bound after the taint appears.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("a toleration with operator Equal needs a key")
        return self


class GpuPoolConfig(Strict):
    """The GPU worker group's pods: the nodes they may run on, the GPUs each holds, and what else
    they ask for."""

    memory: Memory | None = Field(
        None, description="Memory of one GPU of the pool, e.g. 80G (A100 / H100 80 GB) or 141G (H200): plan-time "
                          "checks compare each GPU stage's estimated need per GPU with it; null: not checked (the "
                          "launcher uses its instance type's).")
    per_pod: Annotated[int, Field(ge=1, le=16)] | None = Field(
        None, description="GPUs per pod, e.g. 8 on an 8-GPU node: that many Ray Train workers (or actors) share a "
                          "pod and NCCL stays inside the node; null: the most one worker, actor or replica asks for.")
    node_selector: dict[LabelKey, LabelValue] = Field(
        {}, description="Node labels the GPU pods require, e.g. `{nvidia.com/gpu.product: NVIDIA-H200}` (NVIDIA's "
                        "GPU feature discovery) or a node pool's label.")
    tolerations: list[Toleration] = Field([], description="Taints of the GPU nodes the pods tolerate.")
    affinity: dict[Literal["nodeAffinity", "podAffinity", "podAntiAffinity"], dict[str, Any]] | None = Field(
        None, description="A Kubernetes affinity of the GPU pods (core/v1 Affinity, as in a pod spec); `render` "
                          "checks it against the KubeRay CRD's pod schema.")
    extra_resources: dict[ResourceName, Annotated[int, Field(ge=1)]] = Field(
        {}, description="Extended resources per GPU pod beside its GPUs, e.g. `{vpc.amazonaws.com/efa: 32}` "
                        "(AWS EFA) or an RDMA device plugin's.")


class ModelCacheConfig(Strict):
    """The Hugging Face cache every pod mounts at `path` (HF_HOME): the teacher's weights are
    downloaded into it once per cluster, by the staging job (`render --kind cache`), not by
    each of the 16-32 pods into its own scratch space."""

    claim: DnsName | None = Field(
        None, description="An existing PersistentVolumeClaim holding the cache (ReadWriteMany, e.g. EFS, Filestore "
                          "or an NFS class).")
    volume: dict[str, dict[str, Any]] | None = Field(
        None, description="Instead of `claim`: a Kubernetes volume source, one key, e.g. `{nfs: {server: "
                          "fs.example.com, path: /hf}}` or `{csi: {...}}`; `render` checks it against the pod schema.")
    path: str = Field("/mnt/hf-cache", description="Where every pod mounts it: HF_HOME.")
    read_only: bool = Field(
        True, description="Ray pods mount it read-only and the Hugging Face libraries stay offline "
                          "(HF_HUB_OFFLINE=1): every file comes from what the staging job put there. "
                          "false: pods may download into it.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.claim is None) == (self.volume is None):
            raise ValueError("give exactly one of `claim` (an existing PersistentVolumeClaim) or `volume`")
        if self.volume is not None and len(self.volume) != 1:
            raise ValueError(f"`volume` is one volume source (e.g. nfs, csi), got {sorted(self.volume)}")
        if not self.path.startswith("/"):
            raise ValueError(f"`path` {self.path!r} must be absolute")
        return self


class LauncherConfig(Strict):
    """The Ray cluster launcher file (`render --kind launcher`, AWS)."""

    region: str = Field("us-west-2", description="AWS region.")
    head_instance_type: str = Field("m6i.2xlarge", description="EC2 type of the head (no GPU; runs no tasks).")
    cpu_instance_type: str = Field("m6i.2xlarge", description="EC2 type of the CPU workers.")
    gpu_instance_type: str | None = Field(
        None, description="EC2 type of the GPU workers; each node declares all its GPUs. null: the smallest known "
                          "type whose GPUs hold the definition's estimated need (pipelines/gpu_memory.py).")
    instance_profile: str | None = Field(None, description="IAM instance profile ARN of every node (storage access).")


class ClusterConfig(Strict):
    """What a cluster deployment needs beyond the stages (pipelines/cluster/, docs/cluster.md):
    the image, the Secrets by name, the model cache, the GPU nodes and deadlines. `render` flags
    of the same names override each field (`--gpu-memory 141G`, `--image ...`)."""

    image: Annotated[str, AfterValidator(_project_image)] | None = Field(
        None, description="Container image with this project installed (cluster/Dockerfile, `make image`), on every "
                          "pod; required to render a cluster.")
    image_pull_secrets: list[DnsName] = Field([], description="Secrets of the image's registry (imagePullSecrets).")
    namespace: DnsLabel | None = Field(None, description="Namespace of every object; null: kubectl's current one.")
    service_account: DnsName | None = Field(
        None, description="Service account of every pod (e.g. one bound to an IAM role for s3://).")
    auth_secret: DnsName | None = Field(
        None, description="Secret with key `auth_token`, Ray's cluster token; null: `swd-<name>-ray-token`.")
    storage_secret: DnsName | None = Field(
        None, description="Secret whose keys become environment variables on every Ray container (e.g. "
                          "AWS_ACCESS_KEY_ID); null: `swd-<name>-storage` when the definition uses s3:// and no "
                          "`service_account` is given.")
    hf_token_secret: DnsName | None = Field(
        None, description="Secret with key `HF_TOKEN` (a Hugging Face token that may read a gated teacher): HF_TOKEN "
                          "on the head and every worker; null: none.")
    model_cache: ModelCacheConfig | None = Field(None, description="The shared Hugging Face cache; null: none.")
    gpu: GpuPoolConfig = Field(GpuPoolConfig(), description="The GPU worker group's pods.")
    head_memory: Memory = Field("8Gi", description="Memory of the head pod (the driver runs there).")
    cpu_max_replicas: Annotated[int, Field(ge=1)] = Field(
        4, description="CPU-only worker pods the autoscaler may add for Ray Data's read and map tasks (at least "
                       "what the CPU-only actors need).")
    idle_timeout_seconds: Seconds = Field(
        600, description="Seconds an idle worker pod stays before the autoscaler removes it (Ray's default is 60). A "
                         "RayJob's GPU pods stay for the whole run.")
    active_deadline_seconds: Seconds | None = Field(
        None, description="RayJob: the longest the whole run may take; past it KubeRay stops the job and deletes "
                          "its cluster. null: no limit.")
    start_deadline_seconds: Seconds | None = Field(
        3600, description="RayJob: how long every pod may take to start (GPU nodes scaled up, image pulled) before "
                          "the job fails instead of waiting (`preRunningDeadlineSeconds`, KubeRay 1.7). "
                          "null: no limit.")
    serve_service_type: Literal["ClusterIP", "LoadBalancer", "NodePort"] = Field(
        "ClusterIP", description="RayService: the Serve Service's type; anything but ClusterIP needs an API key.")
    launcher: LauncherConfig = Field(LauncherConfig(), description="The Ray cluster launcher file's AWS settings.")


TOY_TEACHER = "builtin:toy-sd3"


class PipelineConfig(Strict):
    """A pipeline definition: the YAML file `swd run --config` reads."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = Field(
        description="The run's name (letters, digits, `_`, `.`, `-`): outputs go to `<storage>/<name>`.")
    stages: list[Stage] = Field(list(STAGES), description="The stages `swd run` runs, in pipeline order "
                                                          "(`--stages` overrides).")
    teacher: TeacherConfig = Field(description="The teacher model.")
    data: DataConfig = Field(DataConfig(), description="Training data and prompts.")
    synthesize: SynthesizeConfig = Field(SynthesizeConfig(), description="The optional synthesize stage.")
    precompute: PrecomputeConfig = Field(PrecomputeConfig(), description="The precompute stage.")
    distill: DistillConfig = Field(description="The distill stage.")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="The evaluate stage.")
    serve: ServeConfig = Field(ServeConfig(), description="The deploy stage's Ray Serve application.")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="Training workers and storage.")
    retrain: RetrainConfig | None = Field(
        None, description="Scheduled retraining (pipelines/retrain.py); null: none. Not part of `swd run`.")
    cluster: ClusterConfig = Field(ClusterConfig(), description="How a cluster runs the definition (docs/cluster.md).")
    tracking: TrackingConfig = Field(TrackingConfig(), description="Run tracking in MLflow (docs/tracking.md).")

    @model_validator(mode="after")
    def _schedule_fits_model(self):
        try:
            self.schedule()
        except ValueError as err:
            raise ValueError(f"distill.schedule: {err} (teacher family {self.teacher.family!r})") from None
        return self

    @model_validator(mode="after")
    def _validation_has_a_scorer(self):
        v = self.distill.validation
        if v.num_prompts and self.evaluation_domain() != "shapes":
            raise ValueError("distill.validation scores students with the shapes-domain evaluator, and this "
                             f"definition's evaluation domain is {self.evaluation_domain()!r} (teacher "
                             f"{self.teacher.path!r}); set distill.validation.num_prompts: 0")
        if v.num_prompts % self.resources.num_workers:
            raise ValueError(f"distill.validation.num_prompts {v.num_prompts} must be divisible by "
                             f"resources.num_workers {self.resources.num_workers}: each worker samples an equal share")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self):
        b, n = self.distill.batch_size, self.resources.num_workers
        if b % n:
            workers = sorted({d for d in range(1, b + 1) if b % d == 0}, key=lambda d: (abs(d - n), d))[:2]
            batches = sorted({max(n, b - b % n), b - b % n + n})
            raise ValueError(
                f"distill.batch_size {b} is not divisible by resources.num_workers {n}: each worker trains "
                f"batch_size / num_workers rows per step (its micro-batch); use num_workers "
                f"{' or '.join(map(str, sorted(workers)))}, or batch_size {' or '.join(map(str, batches))}")
        return self

    @model_validator(mode="after")
    def _retrain_consistent(self):
        r = self.retrain
        if r is None:
            return self
        n = self.distill.schedule.build().num_steps
        if r.steps % n:
            low, high = max(n, r.steps - r.steps % n), r.steps - r.steps % n + n
            options = f"{low} or {high}" if low != high else f"{high}"
            raise ValueError(f"retrain.steps {r.steps} is not a multiple of the schedule's {n} steps: "
                             f"each cycle must train whole rounds of scales (use {options})")
        if r.gate.metrics is None:
            # elsewhere the teacher-only metric that ranks the toy tables' students most like both toy
            # metrics (re-encoded samples; docs/retrain.md)
            r.gate.metrics = [GateMetric(name="fd" if self.evaluation_domain() == "shapes" else "teacher_cfg_denoise")]
        shapes_only = [m.name for m in r.gate.metrics if m.name in ("fd", "prompt_accuracy")]
        if shapes_only and self.evaluation_domain() != "shapes":
            raise ValueError(f"retrain.gate.metrics {shapes_only} need the shapes-domain scorer and this definition's "
                             f"evaluation domain is {self.evaluation_domain()!r}; "
                             "use the teacher-only metrics: teacher_cfg_denoise, "
                             "teacher_fd, teacher_alignment or teacher_denoise")
        if self.resources.storage.startswith("s3://") and not (r.registry.tracking_uri or self.tracking.uri):
            import os

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                raise ValueError("retrain.registry.tracking_uri: storage is on s3:// and the registry's default "
                                 "SQLite file must be local; set a tracking server URI here or in MLFLOW_TRACKING_URI")
        return self

    def evaluation_domain(self) -> str:
        """shapes (the toy teacher or shapes data: prompt accuracy and FD mean something) or prompts."""
        if self.evaluate.domain != "auto":
            return self.evaluate.domain
        shapes_data = any(s.format == "shapes" for s in self.data.sources)
        return "shapes" if self.teacher.path == TOY_TEACHER or shapes_data else "prompts"

    def schedule(self) -> ScaleSchedule:
        return self.distill.schedule.build(self.teacher.resolved_patch_size, self.teacher.family)

    @property
    def run_dir(self) -> str:
        return f"{self.resources.storage.rstrip('/')}/{self.name}"


class PipelineConfigError(ValueError):
    """A pipeline definition that does not validate; the message lists every problem."""


# Fields renamed so that one concept has one name in every section (the guidance scale, training
# steps); a definition with the old name fails with the new one rather than a guess.
RENAMED: dict[tuple[type[BaseModel], str], str] = {
    (EvaluateConfig, "teacher_guidance"): "teacher_guidance_scale",
    (GateConfig, "teacher_guidance"): "teacher_guidance_scale",
    (RetrainConfig, "iterations"): "steps",
}


def model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Walk the schema along `loc` (without its last part) to the model that holds its last part."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            args = [a for c in candidates for a in getattr(c, "__args__", ())]
            nested = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The fields allowed where the last part of `loc` appeared; None below a free-form field."""
    model = model_at(model, loc)
    return None if model is None else sorted(model.model_fields)


def _renamed(loc: tuple) -> str | None:
    """The new dotted path of a renamed field at `loc`, or None."""
    new = RENAMED.get((model_at(PipelineConfig, loc), loc[-1]))
    return None if new is None else ".".join([*(str(p) for p in loc[:-1]), new])


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid pipeline definition ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p != "[key]")  # a mapping's key: its path names it already
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            if new := _renamed(loc):
                lines.append(f"  - {where}: was renamed to {new}")
                continue
            allowed = _allowed_fields(PipelineConfig, loc) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"  - {where}: unknown field{hint}; allowed here: {', '.join(allowed)}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        if not loc:
            lines.append(f"  - {msg}")
        elif e["type"] == "missing":
            lines.append(f"  - {where}: required field is missing")
        elif isinstance(given, dict):
            lines.append(f"  - {where}: {msg}")
        else:
            lines.append(f"  - {where}: got {given!r}: {msg}")
    return "\n".join(lines)


def parse_pipeline_config(data: Any, source: str = "<config>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise PipelineConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise PipelineConfigError(format_validation_error(err, source)) from None


def _check_key(parts: list[str], item: str, source: str) -> None:
    """Fail on an unknown key, naming the fields allowed at that level (or the new name)."""
    for depth in range(len(parts)):
        allowed = _allowed_fields(PipelineConfig, (*parts[:depth], parts[depth]))
        if allowed is None:
            return  # below a free-form field (a list or mapping): validation checks the rest
        if parts[depth] not in allowed:
            if new := _renamed(tuple(parts[:depth + 1])):
                raise PipelineConfigError(f"{source} {item!r}: {'.'.join(parts[:depth + 1])} was renamed to {new}")
            close = difflib.get_close_matches(parts[depth], allowed, n=1)
            hint = f" (did you mean {'.'.join([*parts[:depth], close[0]])!r}?)" if close else ""
            raise PipelineConfigError(f"{source} {item!r}: unknown field {'.'.join(parts[:depth + 1])!r}{hint}; "
                                      f"allowed there: {', '.join(allowed)}")


def _set(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """`key.path=value` overrides onto a definition's mapping; each value is read as YAML
    (`3`, `1e-4`, `true`, `[8, 16]`, `{a: 1}`). An unknown key fails here, naming the fields
    allowed at that level; a bad value fails in validation like one in the file."""
    data = dict(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise PipelineConfigError(f"{source} {item!r}: expected key.path=value, e.g. distill.steps=600")
        _check_key(parts, item, source)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PipelineConfigError(f"{source} {item!r}: the value is not valid YAML: {err}") from None
        _set(data, parts, value)
    return data


def add_set_argument(parser, default: Any = None) -> None:
    """The `--set KEY.PATH=VALUE` option every entry point that reads a definition takes (an
    argparse parser); pass its list to `load_pipeline_config`."""
    parser.add_argument("--set", action="append", default=[] if default is None else default, metavar="KEY.PATH=VALUE",
                        help="override one field of the definition (value read as YAML); repeatable")


def apply_values(data: dict, values: dict[str, Any], source: str) -> dict:
    """Like `apply_overrides` with values already parsed: {"cluster.namespace": "ml", ...}."""
    data = dict(data)
    for key, value in values.items():
        parts = key.split(".")
        _check_key(parts, key, source)
        _set(data, parts, value)
    return data


def load_pipeline_config(path: str | Path, overrides: list[str] = (), values: dict[str, Any] | None = None,
                         values_source: str = "") -> PipelineConfig:
    """The definition in `path`, with `key.path=value` `overrides` applied before validation, then
    `values` ({dotted path: parsed value}, e.g. from `render`'s flags, which `values_source` names)."""
    path = Path(path)
    if not path.exists():
        raise PipelineConfigError(f"{path}: no such pipeline definition")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineConfigError(f"{path}: not valid YAML: {err}") from None
    if (overrides or values) and not isinstance(data, dict):
        raise PipelineConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, list(overrides))
    if values:
        data = apply_values(data, values, values_source or "override")
    given = ([f"--set {' '.join(overrides)}"] if overrides else []) + ([values_source] if values else [])
    source = f"{path} with {' '.join(given)}" if given else str(path)
    return parse_pipeline_config(data, source)
