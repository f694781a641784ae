"""Evaluate a text-to-image model on held-out prompts, without Ray: images with fixed seeds, the
per-image latency split into its phases, and the shapes-domain scores (prompt accuracy with a
per-attribute breakdown, Fréchet distance to real renders).

`bench/teacher_quality.py` and the pipeline's evaluate stage both go through here, so a number
in the teacher benchmark and one in a run's report mean the same thing.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from swd_core.adapters.base import FamilyAdapter
from swd_core.evaluation import ShapesClassifier, load_classifier, prompt_accuracy, read_scenes
from swd_core.frechet import fd_mean_term, frechet_distance
from swd_core.generate import generate_latents
from swd_core.toy import CLASSIFIER, shapes

PHASES = ("text", "transformer", "vae")
# Real renders use their own jitter stream, never the training one (shapes.dataset seeds [seed, i]).
REAL_RENDER_SEED = 7
FLOOR_RENDER_SEED = 8


@torch.no_grad()
def sample_images(adapter: FamilyAdapter, prompts: Sequence[str], seeds: Sequence[int], *, batch_size: int = 64,
                  progress: Callable[[int], None] | None = None, **sampling) -> torch.Tensor:
    """Generate and decode images in batches. Image i depends only on its prompt and seed, not on
    the batch size.

    Args:
        adapter (`FamilyAdapter`): the model.
        prompts (`Sequence[str]`), seeds (`Sequence[int]`): one each per image.
        batch_size (`int`): images per `generate_latents` call.
        progress (`Callable[[int], None]`, *optional*): called with the images done after each batch.
        sampling: passed to `generate_latents` (`schedule=` for few-step models,
            `teacher_steps=`/`guidance=` for the teacher).

    Returns:
        `torch.Tensor`: (N, 3, H, W) in [-1, 1], float32, on the CPU.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        latents = generate_latents(adapter, prompts[start:stop], seeds[start:stop], **sampling)
        out.append(adapter.decode_latents(latents).float().cpu())
        if progress is not None:
            progress(stop)
    return torch.cat(out) if out else torch.zeros(0, 3, 0, 0)


class PhaseTimer:
    """Stands in for an adapter and adds up the wall time of each phase, so one unchanged
    `generate_latents` call is timed phase by phase. Anything else goes to the adapter (the
    cached empty-prompt embedding for CFG included: a deployment encodes it once, too).

    Args:
        adapter (`FamilyAdapter`): the model to time; CUDA work is synchronised around each call.

    Attributes:
        seconds (`dict[str, float]`), calls (`dict[str, int]`): per phase of `PHASES`.
    """

    def __init__(self, adapter: FamilyAdapter):
        self._adapter = adapter
        self._cuda = adapter.transformer.device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def _timed(self, phase: str, fn, *args, **kwargs):
        if self._cuda:  # kernels are asynchronous: time finished work only
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if self._cuda:
            torch.cuda.synchronize()
        self.seconds[phase] += time.perf_counter() - start
        self.calls[phase] += 1
        return out

    def encode_prompts(self, prompts):
        """The adapter's `encode_prompts`, timed as the "text" phase."""
        return self._timed("text", self._adapter.encode_prompts, prompts)

    def velocity(self, *args, **kwargs):
        """The adapter's `velocity`, timed as the "transformer" phase."""
        return self._timed("transformer", self._adapter.velocity, *args, **kwargs)

    def guided_velocity(self, *args, **kwargs):
        """The adapter's `guided_velocity`, timed as the "transformer" phase (CFG's two halves are
        one call, timed as one)."""
        return self._timed("transformer", self._adapter.guided_velocity, *args, **kwargs)

    def decode_latents(self, latents):
        """The adapter's `decode_latents`, timed as the "vae" phase."""
        return self._timed("vae", self._adapter.decode_latents, latents)


@torch.no_grad()
def latency_split(adapter: FamilyAdapter, prompt: str, seed: int = 0, *, repeats: int = 5, warmup: int = 1,
                  **sampling) -> dict:
    """Per-image latency as a user sees it (one prompt per call): text encoding, the transformer
    calls, VAE decode and the end-to-end total, each the median over `repeats` timed calls after
    `warmup` untimed ones.

    Args:
        adapter (`FamilyAdapter`): the model.
        prompt (`str`), seed (`int`): the one image generated per call.
        repeats (`int`): timed calls, at least 1.
        warmup (`int`): untimed calls first (kernel selection, caches).
        sampling: passed to `generate_latents`, as for `sample_images`.

    Returns:
        `dict`: medians in seconds `text_s`, `transformer_s`, `vae_s`, `total_s` and `other_s`
        (the rest of the total: noise draws, upsampling, Euler math), `transformer_calls` per
        image, `repeats`, and `raw`, the timed values per phase.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    raw = {f"{p}_s": [] for p in (*PHASES, "total")}
    calls = {}
    for i in range(warmup + repeats):
        timer = PhaseTimer(adapter)
        start = time.perf_counter()
        timer.decode_latents(generate_latents(timer, [prompt], [seed], **sampling))
        total = time.perf_counter() - start
        if i < warmup:
            continue
        for p in PHASES:
            raw[f"{p}_s"].append(timer.seconds[p])
        raw["total_s"].append(total)
        calls = dict(timer.calls)
    med = {k: statistics.median(v) for k, v in raw.items()}
    others = [total - sum(raw[f"{p}_s"][j] for p in PHASES) for j, total in enumerate(raw["total_s"])]
    med["other_s"] = statistics.median(others)
    return {**med, "transformer_calls": calls["transformer"], "repeats": repeats, "raw": raw}


def render_real(samples: Sequence[shapes.ShapesSample], seed: int = REAL_RENDER_SEED,
                size: int = shapes.IMAGE_SIZE) -> torch.Tensor:
    """Real shapes images for prompts: image i is drawn from [seed, i] at 64 px, then
    area-downscaled to `size` (as training images of that size are made).

    Args:
        samples (`Sequence[ShapesSample]`): the scenes to render.
        seed (`int`): the jitter stream; the training data's is never used.
        size (`int`): the images' side.

    Returns:
        `torch.Tensor`: (N, 3, size, size) in [-1, 1].
    """
    real = shapes.to_tensor([shapes.render(s, np.random.default_rng([seed, i])) for i, s in enumerate(samples)])
    return real if size == shapes.IMAGE_SIZE else F.interpolate(real, size=(size, size), mode="area")


def to_evaluator_size(images: torch.Tensor) -> torch.Tensor:
    """Resize images to the 64 px the shapes classifier reads (bilinear).

    Args:
        images (`torch.Tensor`): (N, 3, H, W) in [-1, 1].

    Returns:
        `torch.Tensor`: (N, 3, 64, 64) in [-1, 1]; `images` itself when already 64 px.
    """
    if images.shape[-1] == shapes.IMAGE_SIZE:
        return images
    side = (shapes.IMAGE_SIZE,) * 2
    return F.interpolate(images.float(), size=side, mode="bilinear", align_corners=False).clamp(-1, 1)


class ShapesScorer:
    """Scores images generated for held-out shapes prompts: image i answers `samples[i]`.

    Args:
        samples (`Sequence[ShapesSample]`): the prompts, in the order images are generated; a
            model may be scored on any prefix of them.
        classifier (`ShapesClassifier`, *optional*): defaults to the committed one.
        size (`int`, defaults to 64): the side of the images it scores. Smaller images, generated
            and real (renders area-downscaled to `size`), are upscaled to 64 px for the classifier,
            so FD at a size compares a model with real images of that size.
        real_seed (`int`, defaults to 7): jitter stream of the real renders that the Fréchet
            distance compares against: one real image per sample, and n generated images are
            compared with the real images of the same n prompts (as COCO FID compares with the
            images of its captions). With fewer, unpaired real images the metric would mostly
            measure which prompts were drawn: a second real render set of 64 prompts is at FD
            1.05 from the renders of all 640, against 0.01 from the renders of the same 64.
    """

    def __init__(self, samples: Sequence[shapes.ShapesSample], classifier: ShapesClassifier | None = None,
                 real_seed: int = REAL_RENDER_SEED, size: int = shapes.IMAGE_SIZE):
        if classifier is None:
            classifier = load_classifier(CLASSIFIER)
        self.samples = list(samples)
        self.classifier = classifier
        self.size = int(size)
        self.real = render_real(self.samples, real_seed, self.size)
        readings, self.real_features = read_scenes(classifier, to_evaluator_size(self.real))
        self.real_accuracy = prompt_accuracy(self.samples, readings)

    def features(self, images: torch.Tensor) -> tuple[list, torch.Tensor]:
        """What the classifier reads in images generated for `samples[:len(images)]`.

        Args:
            images (`torch.Tensor`): (n, 3, size, size) in [-1, 1], n at most `len(samples)`.

        Returns:
            `tuple[list, torch.Tensor]`: the scene readings (`read_scenes`) and the classifier
            features, (n, d).
        """
        if tuple(images.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"this scorer reads {self.size}x{self.size} images, got {tuple(images.shape[-2:])}")
        if len(images) > len(self.samples):
            raise ValueError(f"{len(images)} images but only {len(self.samples)} prompts to score them against")
        return read_scenes(self.classifier, to_evaluator_size(images))

    def fd(self, features: torch.Tensor) -> float:
        """Fréchet distance of the features of images for `samples[:n]` to the real renders of the
        same n prompts. It depends on n: compare models at the same n (see `fd_floor`).

        Args:
            features (`torch.Tensor`): (n, d) classifier features, n at least 2.

        Returns:
            `float`
        """
        if len(features) < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 images, got {len(features)}")
        return frechet_distance(self.real_features[:len(features)], features)

    def score(self, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Prompt accuracy (overall, one-/two-object, per attribute) against `samples[:len(images)]`
        and the Fréchet distance with its mean-shift part.

        Args:
            images (`torch.Tensor`): (n, 3, size, size) in [-1, 1], image i generated for `samples[i]`.

        Returns:
            `tuple[dict, torch.Tensor]`: the scores (`prompt_accuracy`'s, plus `fd`,
            `fd_mean_term` and `fd_n`) and the classifier features.
        """
        readings, feats = self.features(images)
        acc = prompt_accuracy(self.samples[:len(images)], readings)
        return {**acc, "fd": self.fd(feats), "fd_mean_term": fd_mean_term(self.real_features[:len(feats)], feats),
                "fd_n": len(images)}, feats

    def fd_floor(self, n: int, seed: int = FLOOR_RENDER_SEED) -> float:
        """FD of a second set of real renders (other jitter) of the first `n` prompts: roughly what a
        perfect model scores with `n` images, the floor of the metric at that sample size.

        Args:
            n (`int`): the prompts, as many as the model's images.
            seed (`int`): the second set's jitter stream.

        Returns:
            `float`
        """
        _, feats = self.features(render_real(self.samples[:n], seed, self.size))
        return self.fd(feats)


def load_exported_student(folder: str, family: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """An exported student (`swd_core.export.export_merged_pipeline`) as (adapter, schedule,
    record): the project's own sampler with the exported sigmas and scales, the same code path
    that samples the teacher. The family is the folder's (`swd_schedule.json`); `family`, when
    given, is what the caller expects, and another one is refused.

    Args:
        folder (`str`): the exported student.
        family (`str`, *optional*): the family the caller expects.
        dtype (`str`), device (`str`): where and how its weights load.

    Returns:
        `tuple[FamilyAdapter, ScaleSchedule, dict]`: the model, its sampling schedule and its
        `read_schedule` record.

    Raises:
        ValueError: the folder holds another family than `family`.
    """
    from swd_core.adapters import load_adapter
    from swd_core.export import read_schedule
    from swd_core.schedules import ScaleSchedule

    record = read_schedule(folder)
    stored = record.get("family", "sd3")  # a record without a family is an SD3 export
    if family is not None and family != stored:
        raise ValueError(f"{folder} is an exported {stored!r} student and the definition's teacher is family "
                         f"{family!r}; point the definition at a {family!r} export")
    extra = {"guidance_scale": record["guidance_scale"]} if stored == "flux" else {}
    adapter = load_adapter(stored, str(folder), dtype=dtype, device=device,
                           max_sequence_length=record["max_sequence_length"], **extra)
    boundaries = tuple(record["boundaries"]) if record.get("boundaries") else None
    schedule = ScaleSchedule(tuple(record["scales"]), tuple(record["sigmas"]), boundaries, adapter.patch_size)
    return adapter, schedule, record
