"""The pipeline definition: one typed schema for every stage.

Loaded from YAML by `load_pipeline_config`; an invalid file fails with `PipelineConfigError`,
whose message names each bad field, the value given and what is allowed. One module for the
whole definition (longer than the others): a reader finds every field, its default and its
checks in one place, in the order of the YAML's sections.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swd_core.lora import DEFAULT_TARGETS
from swd_core.schedules import GRID_STEPS, PRESETS, ScaleSchedule, preset

# Patch size per model family, so schedules can be validated before any weights are loaded.
FAMILY_PATCH_SIZE = {"sd3": 2}
Stage = Literal["synthesize", "precompute", "distill", "evaluate", "deploy", "preview"]
STAGES: tuple[str, ...] = get_args(Stage)


# Memory of one actor, worker or replica, as a Kubernetes quantity ("48Gi", "512Mi"): rendered
# cluster manifests size their pods from it (pipelines/cluster.py). None: the renderer's default.
Memory = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Strict):
    path: str = Field(description="diffusers folder, hub id, or builtin:tiny-sd3[?opts]")
    family: Literal["sd3"] = "sd3"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_sequence_length: Annotated[int, Field(ge=0, le=512)] = 256
    patch_size: Annotated[int, Field(ge=1)] | None = None  # for a custom transformer; default per family

    @property
    def resolved_patch_size(self) -> int:
        return self.patch_size or FAMILY_PATCH_SIZE[self.family]


class DataSource(Strict):
    """One input of the precompute stage (pipelines/sources.py).

    `parquet`: a Parquet file or folder (local or s3://) with image bytes and caption columns.
    `imagefolder`: a folder with image files and a `metadata.csv` (`file_name`, `caption`).
    `shapes`: the procedural toy dataset (swd_core.toy.shapes), `limit` rows from `seed`;
    `path` is only its label (e.g. "builtin:shapes").
    """

    path: str
    format: Literal["parquet", "imagefolder", "shapes"] = "parquet"
    image_column: str = "image"
    caption_column: str = "caption"
    limit: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0  # shapes only

    @model_validator(mode="after")
    def _shapes_needs_limit(self):
        if self.format == "shapes" and self.limit is None:
            raise ValueError("a `shapes` source needs `limit` (how many rows to generate)")
        return self


class DataConfig(Strict):
    sources: list[DataSource] = []
    prompts: str | None = None  # text file (one prompt per line) or Parquet with a `prompt` column
    eval_prompts: str | None = None
    preview_prompts: list[str] = ["a photo"]


class SynthesizeConfig(Strict):
    enabled: bool = False
    num_steps: Annotated[int, Field(ge=1, le=1000)] = 28
    guidance_scale: Annotated[float, Field(ge=0)] = 7.0
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1)] = 8
    actors: Annotated[int, Field(ge=1)] = 1
    cpus_per_actor: Annotated[float, Field(ge=0)] = 1.0
    gpus_per_actor: Annotated[float, Field(ge=0)] = 0.0
    memory_per_actor: Memory | None = None
    output: str | None = None  # default: <run_dir>/synthesized


class PrecomputeConfig(Strict):
    batch_size: Annotated[int, Field(ge=1)] = 16
    actors: Annotated[int, Field(ge=1)] = 1
    cpus_per_actor: Annotated[float, Field(ge=0)] = 1.0
    gpus_per_actor: Annotated[float, Field(ge=0)] = 0.0
    memory_per_actor: Memory | None = None
    storage_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    output: str | None = None  # default: <run_dir>/store


class ScheduleConfig(Strict):
    """Either a `preset` or explicit `scales` with `boundaries` (grid indices) or `sigmas`."""

    preset: str | None = None
    scales: list[int] | None = None
    boundaries: list[int] | None = None
    sigmas: list[float] | None = None
    scalewise: bool = True  # False: the full-resolution baseline with the same sigmas

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

    def build(self, patch_size: int | None = None) -> ScaleSchedule:
        if self.preset is not None:
            schedule = preset(self.preset, patch_size)
        elif self.boundaries is not None:
            schedule = ScaleSchedule.from_boundaries(self.scales, self.boundaries, patch_size)
        else:
            schedule = ScaleSchedule(tuple(self.scales), tuple(self.sigmas), None, patch_size)
        return schedule if self.scalewise else schedule.full_resolution()


def _check_grid_range(v: tuple[int, int]) -> tuple[int, int]:
    lo, hi = v
    if not 0 <= lo < hi <= GRID_STEPS:
        raise ValueError(f"grid_range must be [low, high) indices into the {GRID_STEPS}-step sigma grid, 0 <= low < high <= {GRID_STEPS}")
    return v


GridRange = Annotated[tuple[int, int], AfterValidator(_check_grid_range)]


class MMDLoss(Strict):
    weight: Annotated[float, Field(ge=0)] = 1.0
    kernel: Literal["linear", "rbf"] = "linear"
    c: Annotated[float, Field(gt=0)] = 1e-3
    rbf_bandwidth: Annotated[float, Field(gt=0)] = 100.0
    grid_range: GridRange = (18, 28)  # σ ≤ 0.602: MMD compares fine detail


class DMDLoss(Strict):
    weight: Annotated[float, Field(ge=0)] = 1.0
    guidance_scale: Annotated[float, Field(ge=0)] = 7.0
    grid_range: GridRange = (12, 28)
    # DMD only at scales (latent side) >= this: for a teacher trained at one resolution, whose
    # scores at the small scales are off its training distribution. 0: every scale (the paper).
    min_scale: Annotated[int, Field(ge=0)] = 0


class GANLoss(Strict):
    weight: Annotated[float, Field(ge=0)] = 5e-3
    discriminator_weight: Annotated[float, Field(ge=0)] = 1e-2


class LossesConfig(Strict):
    mmd: MMDLoss = MMDLoss()
    dmd: DMDLoss = DMDLoss()
    gan: GANLoss = GANLoss()
    feature_block: Annotated[int, Field(ge=0)] = 11  # 0-based block whose image tokens feed MMD and the GAN head

    @model_validator(mode="after")
    def _something_to_learn(self):
        if self.mmd.weight == self.dmd.weight == self.gan.weight == 0:
            raise ValueError("all loss weights are 0: enable at least one of mmd, dmd, gan")
        return self


class LoRAConfig(Strict):
    rank: Annotated[int, Field(ge=1)] = 64
    alpha: Annotated[float, Field(gt=0)] | None = None  # default: = rank
    targets: list[str] = list(DEFAULT_TARGETS)


class ValidationConfig(Strict):
    """Choosing the exported student by a held-out score (early stopping): at every checkpoint the
    student samples `num_prompts` validation prompts, disjoint from the evaluate stage's, and the
    export in <run_dir>/student is replaced only when `metric` improves. Shapes domain only: it
    is the domain with a scorer. 0 prompts: off, the last step is exported."""

    num_prompts: Annotated[int, Field(ge=0, le=640)] = 0
    metric: Literal["fd", "prompt_accuracy"] = "fd"  # fd: lower is better; prompt_accuracy: higher
    batch_size: Annotated[int, Field(ge=1)] = 64

    @field_validator("num_prompts")
    @classmethod
    def _enough_for_a_distance(cls, v: int):
        if v == 1:
            raise ValueError("validation.num_prompts: the Fréchet distance needs at least 2 images (0 turns validation off)")
        return v

    @property
    def score_key(self) -> str:
        """The reported metric the choice follows (also Ray's checkpoint score attribute)."""
        return f"val_{self.metric}"

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric == "fd" else "max"


class DistillConfig(Strict):
    schedule: ScheduleConfig
    losses: LossesConfig = LossesConfig()
    mode: Literal["lora", "full"] = "lora"
    lora: LoRAConfig = LoRAConfig()
    zero_stage: Literal[0, 1, 2, 3] = 2
    batch_size: Annotated[int, Field(ge=1)] = 64  # global batch
    steps: Annotated[int, Field(ge=1)] = 3000
    lr: Annotated[float, Field(gt=0)] = 5e-6
    fake_lr: Annotated[float, Field(gt=0)] | None = None  # default: = lr
    weight_decay: Annotated[float, Field(ge=0)] = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: Annotated[float, Field(gt=0)] = 10.0
    # the last fraction of the steps over which both learning rates fall linearly to 0 (0: constant, as in the paper)
    lr_decay_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    fake_updates: Annotated[int, Field(ge=0)] = 5
    # exponential moving average of the student's weights (diffusers' EMAModel, with its warm-up
    # n/(9+n) at update n up to this decay); the export and the evaluation use the average. 0: off.
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # a multiple of the schedule's step count, so every checkpoint (and validation) follows a
    # full round of scales; 240 divides by 2, 3, 4, 5, 6 and 8
    checkpoint_every: Annotated[int, Field(ge=1)] = 240
    # rows are shuffled per epoch within consecutive windows of this many rows of each worker's
    # range (the whole range when it is smaller), seeded by `seed` and the epoch; 0: file order.
    # A worker holds one window of decoded rows: size it by the row's bytes (text embeddings + latents)
    shuffle_window: Annotated[int, Field(ge=0)] = 1024
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    max_failures: Annotated[int, Field(ge=-1)] = 2  # worker failures to recover from (-1: unlimited)
    log_every: Annotated[int, Field(ge=1)] = 10
    export_at_checkpoints: bool = False  # also export the student (LoRA + merged) at each checkpoint
    validation: ValidationConfig = ValidationConfig()
    seed: int = 0

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


class EvaluateConfig(Strict):
    """The evaluate stage (pipelines/stages/evaluate.py, docs/evaluate.md): the teacher with CFG,
    the teacher at the student's step count without CFG, and the exported student, on the same
    held-out prompts and seeds. The few-step models share `num_prompts` so their accuracy and FD
    compare like for like; the CFG teacher is the expensive one and gets its own count."""

    num_prompts: Annotated[int, Field(ge=2)] = 64  # few-step models (teacher at N steps, student)
    teacher_num_prompts: Annotated[int, Field(ge=2)] | None = None  # the CFG teacher; default num_prompts
    seed: int = 0  # image i uses seed + i in every model
    teacher_steps: Annotated[int, Field(ge=1)] = 28
    teacher_guidance: Annotated[float, Field(ge=0)] = 7.0
    student: str | None = None  # exported student folder (local or s3://); default <run_dir>/student/merged
    domain: Literal["auto", "shapes", "prompts"] = "auto"  # auto: shapes for the toy teacher / shapes data
    batch_size: Annotated[int, Field(ge=1)] = 64
    latency_repeats: Annotated[int, Field(ge=1)] = 5  # timed single-image calls per model (median)
    grid_prompts: Annotated[int, Field(ge=1)] = 8  # rows of the comparison grid


class ServeConfig(Strict):
    """The deploy stage's Ray Serve application (pipelines/serve). `model` defaults to the distill
    stage's export, `<run_dir>/student/merged`; changing it on a running app hot-swaps the model."""

    model: str | None = None  # exported student folder: local path or s3:// prefix
    model_id: str | None = None  # default: "<name>-swd"
    app_name: str | None = None  # default: "swd-<name>"
    route_prefix: str = "/"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    replicas: Annotated[int, Field(ge=1)] = 1
    cpus_per_replica: Annotated[float, Field(ge=0)] = 1.0
    gpus_per_replica: Annotated[float, Field(ge=0)] = 0.0
    memory_per_replica: Memory | None = None
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 16  # per generator replica; >= max_batch_size
    max_queued_requests: Annotated[int, Field(ge=1)] = 64  # beyond this, a quick 503
    max_batch_size: Annotated[int, Field(ge=1)] = 8
    batch_wait_timeout_s: Annotated[float, Field(ge=0)] = 0.05
    min_replicas: Annotated[int, Field(ge=0)] | None = None  # set min/max_replicas to autoscale
    max_replicas: Annotated[int, Field(ge=1)] | None = None
    target_ongoing_requests: Annotated[float, Field(gt=0)] | None = None  # autoscaling; default max_batch_size
    max_images: Annotated[int, Field(ge=1, le=64)] = 4  # largest `n` per request
    max_prompt_chars: Annotated[int, Field(ge=1)] = 1000
    api_key_env: str | None = None  # bearer-token auth: the key from this environment variable ...
    api_key_file: str | None = None  # ... or from this file (read on each replica)

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas (or neither, for a fixed `replicas`)")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give at most one of api_key_env and api_key_file")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix {self.route_prefix!r} must start with '/'")
        return self


class S3Config(Strict):
    endpoint_url: str | None = None  # default: the standard AWS variables / config
    region: str | None = None


class ResourcesConfig(Strict):
    num_workers: Annotated[int, Field(ge=1)] = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    memory_per_worker: Memory | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage: str = "runs"  # local directory or s3://bucket/prefix
    s3: S3Config = S3Config()

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
                  "prompt_accuracy"] = "teacher_denoise"
    direction: Literal["min", "max"] | None = None  # default: the metric's own (max for prompt_accuracy, teacher_alignment)
    min_margin: float = 0.0

    @property
    def resolved_direction(self) -> Literal["min", "max"]:
        return self.direction or ("max" if self.name in ("prompt_accuracy", "teacher_alignment") else "min")


class GateConfig(Strict):
    """The promotion gate: candidate and champion sample the same held-out prompts (the evaluate
    stage's) with the same seeds, `seed + i` for prompt i, and are scored with `metrics`; every
    metric must pass. teacher_denoise and teacher_fd need only the teacher (swd_core.teacher_metrics);
    fd and prompt_accuracy need the shapes domain's scorer."""

    # default: fd in the shapes domain, else teacher_fd (docs/retrain.md says how far the
    # teacher-only metrics agree with the toy's; choose with that in mind)
    metrics: Annotated[list[GateMetric], Field(min_length=1)] | None = None
    num_prompts: Annotated[int, Field(ge=2)] = 64
    seed: int = 0
    sigma: Annotated[float, Field(gt=0, lt=1)] = 0.5  # the fixed noise level of the teacher metrics
    alignment_sigmas: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default=[0.3, 0.45, 0.6, 0.75], min_length=1,
        description="Noise levels that teacher_alignment averages over (its noise is the one of teacher_denoise).")
    cfg_denoise_sigmas: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default=[0.3, 0.45], min_length=1,
        description="Noise levels that teacher_cfg_denoise averages over; its CFG scale is teacher_guidance.")
    block: Annotated[int, Field(ge=0)] | None = None  # teacher block of teacher_fd's features; default the middle one
    teacher_steps: Annotated[int, Field(ge=1)] = 28  # the teacher's reference samples for teacher_fd
    teacher_guidance: Annotated[float, Field(ge=0)] = 4.5
    batch_size: Annotated[int, Field(ge=1)] = 32
    grid_prompts: Annotated[int, Field(ge=1)] = 6  # rows of the candidate-vs-champion grid


class RegistryConfig(Strict):
    """MLflow tracking and model registry. Default: a SQLite file under the run's storage (local
    storage only); on a cluster a tracking server, here or in MLFLOW_TRACKING_URI."""

    tracking_uri: str | None = None
    model_name: str | None = None  # registered model; default: the definition's name


class RetrainConfig(Strict):
    """Scheduled retraining (pipelines/retrain.py, docs/retrain.md): on each cron tick one cycle
    encodes the new rows of `data.sources` into the shared store, trains the champion
    `iterations` more steps, scores candidate and champion with the gate, and promotes the
    candidate only when it passes."""

    schedule: str = "0 3 * * *"  # 5-field cron, as KubeRay's RayCronJob and Kubernetes' CronJob read it
    timezone: str = "UTC"  # IANA name, e.g. Europe/Berlin
    iterations: Annotated[int, Field(ge=1)] = 240  # training steps per cycle: whole rounds of the schedule
    warm_start: bool = True  # from the champion's checkpoint: adapters, GAN head, optimizer state, EMA
    # a cycle that finds fewer new rows than this in data.sources changes nothing (0: train anyway)
    min_new_rows: Annotated[int, Field(ge=0)] = 1
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: bool = True  # the cycle deploys the champion (first) or hot-swaps the running app to it
    lock_ttl_s: Annotated[float, Field(ge=5)] = 60.0  # a dead holder's lock expires after this

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


TOY_TEACHER = "builtin:toy-sd3"


class PipelineConfig(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    stages: list[Stage] = list(STAGES)
    teacher: TeacherConfig
    data: DataConfig = DataConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    distill: DistillConfig
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()
    resources: ResourcesConfig = ResourcesConfig()
    retrain: RetrainConfig | None = None  # scheduled retraining (pipelines/retrain.py); not part of `make run`

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
    def _retrain_consistent(self):
        r = self.retrain
        if r is None:
            return self
        n = self.distill.schedule.build().num_steps
        if r.iterations % n:
            low, high = max(n, r.iterations - r.iterations % n), r.iterations - r.iterations % n + n
            options = f"{low} or {high}" if low != high else f"{high}"
            raise ValueError(f"retrain.iterations {r.iterations} is not a multiple of the schedule's {n} steps: "
                             f"each cycle must train whole rounds of scales (use {options})")
        if r.gate.metrics is None:
            r.gate.metrics = [GateMetric(name="fd" if self.evaluation_domain() == "shapes" else "teacher_fd")]
        shapes_only = [m.name for m in r.gate.metrics if m.name in ("fd", "prompt_accuracy")]
        if shapes_only and self.evaluation_domain() != "shapes":
            raise ValueError(f"retrain.gate.metrics {shapes_only} need the shapes-domain scorer and this definition's "
                             f"evaluation domain is {self.evaluation_domain()!r}; use teacher_denoise or teacher_fd")
        if self.resources.storage.startswith("s3://") and not r.registry.tracking_uri:
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
        return self.distill.schedule.build(self.teacher.resolved_patch_size)

    @property
    def run_dir(self) -> str:
        return f"{self.resources.storage.rstrip('/')}/{self.name}"


class PipelineConfigError(ValueError):
    """A pipeline definition that does not validate; the message lists every problem."""


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Walk the schema along `loc` to list the fields allowed where an unknown one appeared."""
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
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid pipeline definition ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
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
        for depth in range(len(parts)):
            allowed = _allowed_fields(PipelineConfig, (*parts[:depth], parts[depth]))
            if allowed is None:
                break  # below a free-form field (a list or mapping): validation checks the rest
            if parts[depth] not in allowed:
                close = difflib.get_close_matches(parts[depth], allowed, n=1)
                hint = f" (did you mean {'.'.join([*parts[:depth], close[0]])!r}?)" if close else ""
                raise PipelineConfigError(f"{source} {item!r}: unknown field {'.'.join(parts[:depth + 1])!r}{hint}; "
                                          f"allowed there: {', '.join(allowed)}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PipelineConfigError(f"{source} {item!r}: the value is not valid YAML: {err}") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = value
    return data


def load_pipeline_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """The definition in `path`, with `key.path=value` `overrides` applied before validation."""
    path = Path(path)
    if not path.exists():
        raise PipelineConfigError(f"{path}: no such pipeline definition")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineConfigError(f"{path}: not valid YAML: {err}") from None
    if overrides:
        if not isinstance(data, dict):
            raise PipelineConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        data = apply_overrides(data, list(overrides))
    source = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    return parse_pipeline_config(data, source)
