"""The promotion gate: candidate and champion sample the same held-out prompts with the same seeds
(the evaluate stage's prompts, seed `gate.seed + i` for prompt i) and are scored alike; the
candidate is promoted only when it passes every metric of `retrain.gate.metrics`, each judged on
the bootstrap interval over prompts of the paired difference candidate − champion
(swd_core.bootstrap), not on the two point values.

Metrics: `teacher_denoise`, `teacher_fd`, `teacher_alignment` and `teacher_cfg_denoise` need only
the teacher (swd_core.teacher_metrics), so they gate any teacher; `fd` and `prompt_accuracy` are
the shapes domain's (the toy's classifier); `clip_score`, `pickscore` and `fd_dinov2` (to the
teacher's own samples of the gate prompts) read pretrained models (swd_core.image_metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipelines.schema import PipelineConfig
from pipelines.storage import local_copy

TEACHER_METRICS = ("teacher_denoise", "teacher_fd", "teacher_alignment", "teacher_cfg_denoise")
SHAPES_METRICS = ("fd", "prompt_accuracy")
IMAGE_METRICS = ("clip_score", "pickscore", "fd_dinov2")


@dataclass
class Scored:
    metrics: dict  # the value of each gate metric on all gate prompts
    images: torch.Tensor  # the first `grid_prompts` images, for the comparison grid
    readings: dict = field(default_factory=dict)  # per metric, its swd_core.bootstrap.Reading


class Gate:
    """Scores models for one definition; the teacher, the prompts and the references load once."""

    def __init__(self, cfg: PipelineConfig, device: str = "cpu"):
        from pipelines.stages.evaluate import eval_prompts

        self.cfg, self.g, self.device = cfg, cfg.retrain.gate, device
        self.names = [m.name for m in self.g.metrics]
        domain = cfg.evaluation_domain()
        self.prompts, self.samples, self.source, _ = eval_prompts(cfg, domain, self.g.num_prompts)
        self.seeds = [self.g.seed + i for i in range(len(self.prompts))]
        self._teacher = None
        self._reference = None
        self._reference_latents = None
        self._scorer = None
        self._image_metrics = None
        self._dinov2_reference = None
        if any(n in SHAPES_METRICS for n in self.names):
            from swd_core.evaluate_model import ShapesScorer

            self._scorer = ShapesScorer(self.samples)

    def image_metrics(self):
        if self._image_metrics is None:
            from pipelines.stages.evaluate import metric_model_paths
            from swd_core.image_metrics import ImageMetrics

            self._image_metrics = ImageMetrics([n for n in self.names if n in IMAGE_METRICS],
                                               metric_model_paths(self.cfg), device=self.device,
                                               batch_size=self.cfg.evaluate.metric_batch_size)
        return self._image_metrics

    def dinov2_reference(self):
        """DINOv2 features of the teacher's own samples of the gate prompts (`fd_dinov2`'s reference)."""
        if self._dinov2_reference is None:
            self._dinov2_reference = self.image_metrics().reference_features(self._decode(self.reference_latents()))
        return self._dinov2_reference

    def describe(self) -> dict:
        return {"prompts": self.source, "num_prompts": len(self.prompts), "seeds": f"{self.g.seed}..{self.seeds[-1]}",
                "metrics": [m.model_dump() for m in self.g.metrics], "sigma": self.g.sigma,
                "bootstrap_resamples": self.g.bootstrap_resamples, "confidence": self.g.confidence,
                "alignment_sigmas": list(self.g.alignment_sigmas),
                "cfg_denoise_sigmas": list(self.g.cfg_denoise_sigmas)}

    def teacher(self):
        if self._teacher is None:
            from swd_core.adapters import load_adapter

            t = self.cfg.teacher
            self._teacher = load_adapter(t.family, t.path, dtype=t.dtype, device=self.device,
                                         max_sequence_length=t.max_sequence_length)
        return self._teacher

    def _readings(self, latents: torch.Tensor):
        from swd_core.teacher_metrics import teacher_readings

        return teacher_readings(self.teacher(), latents, self.prompts, self.seeds, sigma=self.g.sigma,
                                block=self.g.block, batch_size=self.g.batch_size)

    def reference_latents(self) -> torch.Tensor:
        """The teacher's own samples of the gate prompts (its full sampler with CFG)."""
        if self._reference_latents is None:
            from swd_core.generate import generate_latents

            teacher, out = self.teacher(), []
            for start in range(0, len(self.prompts), self.g.batch_size):
                stop = start + self.g.batch_size
                out.append(generate_latents(teacher, self.prompts[start:stop], self.seeds[start:stop],
                                            teacher_steps=self.g.teacher_steps,
                                            guidance=self.g.teacher_guidance_scale))
            self._reference_latents = torch.cat(out)
        return self._reference_latents

    def reference_features(self) -> torch.Tensor:
        """The teacher's own samples read by `teacher_readings`."""
        if self._reference is None:
            latents = self.reference_latents()
            if self.g.reencode:
                latents = self._encode(self._decode(latents))
            self._reference = self._readings(latents)[1]
        return self._reference

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, adapter=None) -> torch.Tensor:
        """Images on the CPU, decoded in batches by `adapter` (default: the teacher's VAE)."""
        b, adapter = self.g.batch_size, adapter or self.teacher()
        return torch.cat([adapter.decode_latents(latents[i:i + b].to(adapter.device)).float().cpu()
                          for i in range(0, len(latents), b)])

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # A sampler's latents can hold components the decoder discards (off the encoder's outputs,
        # which the teacher was trained on); read what the user sees instead. On the toy's table
        # students this turned the denoising losses' rank agreement with the toy's FD from about
        # 0 to about 0.5 (docs/retrain.md).
        b, teacher = self.g.batch_size, self.teacher()
        return torch.cat([teacher.encode_images(images[i:i + b]).float().cpu() for i in range(0, len(images), b)])

    @torch.no_grad()
    def sample(self, student_uri: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, images) of the exported student at `student_uri` (a merged pipeline folder)."""
        from swd_core.evaluate_model import load_exported_student
        from swd_core.generate import generate_latents

        adapter, schedule, _ = load_exported_student(str(local_copy(student_uri, self.cfg.resources)),
                                                     self.cfg.teacher.family, self.cfg.teacher.dtype, self.device)
        latents = torch.cat([generate_latents(adapter, self.prompts[i:i + self.g.batch_size],
                                              self.seeds[i:i + self.g.batch_size], schedule=schedule)
                             for i in range(0, len(self.prompts), self.g.batch_size)])
        return latents, self._decode(latents, adapter)

    def score(self, student_uri: str) -> Scored:
        """Every gate metric of the exported student at `student_uri` (a merged pipeline folder)."""
        return self.score_samples(*self.sample(student_uri))

    @torch.no_grad()
    def score_samples(self, latents: torch.Tensor, images: torch.Tensor) -> Scored:
        """Every gate metric of a model's samples of the gate prompts (`sample`): its value and
        its per-prompt reading, for the interval of the difference to another model."""
        from swd_core.bootstrap import Reading

        readings = {}

        def per_prompt(name, values):
            readings[name] = Reading(values=torch.as_tensor(values).double().cpu().numpy())

        if self.g.reencode and any(n in TEACHER_METRICS for n in self.names):
            latents = self._encode(images)
        if "teacher_alignment" in self.names:
            from swd_core.teacher_metrics import teacher_alignment

            per_prompt("teacher_alignment", teacher_alignment(
                self.teacher(), latents, self.prompts, self.seeds, sigmas=self.g.alignment_sigmas,
                batch_size=self.g.batch_size))
        if "teacher_cfg_denoise" in self.names:
            from swd_core.teacher_metrics import teacher_cfg_denoise

            per_prompt("teacher_cfg_denoise", teacher_cfg_denoise(
                self.teacher(), latents, self.prompts, self.seeds, sigmas=self.g.cfg_denoise_sigmas,
                guidance=self.g.teacher_guidance_scale, batch_size=self.g.batch_size))
        if any(n in ("teacher_denoise", "teacher_fd") for n in self.names):
            losses, feats = self._readings(latents)
            per_prompt("teacher_denoise", losses)
            if "teacher_fd" in self.names:
                readings["teacher_fd"] = Reading(features=feats.numpy(), reference=self.reference_features().numpy())
        if self._scorer is not None:
            from swd_core.evaluation import judge

            seen, feats = self._scorer.features(images)
            samples = self._scorer.samples[:len(images)]
            readings["fd"] = Reading(features=feats.numpy(), reference=self._scorer.real_features[:len(feats)].numpy())
            readings["prompt_accuracy"] = Reading(
                values=torch.tensor([float(judge(x, r)["all"]) for x, r in zip(samples, seen)]).double().numpy())
        if any(n in IMAGE_METRICS for n in self.names):
            raw = self.image_metrics().read(images, self.prompts)
            for name in ("clip_score", "pickscore"):
                if name in raw:
                    per_prompt(name, raw[name])
            if "dinov2" in raw:
                readings["fd_dinov2"] = Reading(features=raw["dinov2"], reference=self.dinov2_reference())
        # Fréchet distances by swd_core.bootstrap's exact factored form: the gate has fewer prompts
        # than feature dimensions, where a matrix square root of the covariances is inaccurate
        return Scored({n: readings[n].statistic() for n in self.names}, images[:self.g.grid_prompts],
                      {n: readings[n] for n in self.names})

    def score_pair(self, candidate: str, champion: str | None) -> tuple[Scored, Scored | None]:
        return self.score(candidate), (self.score(champion) if champion is not None else None)

    def intervals(self, scored: Scored) -> dict:
        """Each gate metric of one model with its bootstrap interval over the gate prompts."""
        from swd_core.bootstrap import estimate

        return {m.name: estimate(scored.readings[m.name], self.g.bootstrap_resamples, self.g.confidence).as_dict()
                for m in self.g.metrics}

    def verdict(self, candidate: Scored, champion: Scored | None) -> tuple[bool, list[str], dict]:
        """(passed, one line per metric, the paired difference candidate − champion of each metric
        with its interval). A metric passes when the candidate's gain over the champion (the
        difference, signed so that better is positive) has the lower end of its interval at or
        above `min_margin`. With no champion, the first candidate passes."""
        from swd_core.bootstrap import paired_difference

        if champion is None:
            return True, ["no champion yet: the first version is promoted"], {}
        passed, lines, differences = True, [], {}
        level = f"{self.g.confidence:.0%}"
        for m in self.g.metrics:
            c, h = candidate.metrics[m.name], champion.metrics[m.name]
            diff = paired_difference(candidate.readings[m.name], champion.readings[m.name],
                                     self.g.bootstrap_resamples, self.g.confidence)
            differences[m.name] = diff.as_dict()
            sign = -1.0 if m.resolved_direction == "min" else 1.0  # gain > 0: the candidate is better
            low, high = sorted((sign * diff.lo + 0.0, sign * diff.hi + 0.0))  # + 0.0: a tie gains +0, not -0
            gain = sign * diff.value + 0.0
            ok = low >= m.min_margin
            passed &= ok
            better = "lower" if m.resolved_direction == "min" else "higher"
            lines.append(f"{m.name}: candidate {c:.4f} vs champion {h:.4f} ({better} is better; gain {gain:+.4f}, "
                         f"{level} interval [{low:+.4f}, {high:+.4f}] over {diff.n} prompts, its lower end needs "
                         f">= {m.min_margin:+.4f}): {'pass' if ok else 'FAIL'}")
        return passed, lines, differences


def score_in_task(cfg: PipelineConfig, candidate: str, champion: str | None) -> tuple[Scored, Scored | None]:
    """The candidate's and the champion's scores, in one Ray task holding the evaluate stage's
    resources (`evaluate.cpus` / `evaluate.gpus`), as the evaluate stage runs."""
    from pipelines.placement import run_as_task

    return run_as_task("retrain-gate", _score_pair, cfg, candidate, champion,
                       cpus=cfg.evaluate.cpus, gpus=cfg.evaluate.gpus)


def _score_pair(cfg: PipelineConfig, candidate: str, champion: str | None):
    from pipelines.placement import stage_device

    gate = Gate(cfg, stage_device("retrain gate", "evaluate.gpus", cfg.evaluate.gpus))
    cand, champ = gate.score_pair(candidate, champion)
    return cand, champ
