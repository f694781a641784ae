"""Early stopping on held-out prompts (`distill.validation`): the `Validation` class scores the
student at each checkpoint and keeps the export on the best step."""

from __future__ import annotations

import math
from typing import Callable

import torch

from pipelines.logs import logger
from pipelines.schema import PipelineConfig
from pipelines.stages.distill.export import RECORD_FILE, student_dir, write_record

log = logger(__name__)


class Validation:
    """Early stopping on held-out prompts (`distill.validation`). At each checkpoint every worker
    samples its share of the validation prompts with the student as it would be exported; rank 0
    scores them all with the shapes evaluator and every rank receives the scores, so all agree on
    whether the export is replaced (a ZeRO-3 export gathers shards on every rank)."""

    def __init__(self, cfg: PipelineConfig, rank: int, world: int, image_size: int):
        from swd_core.toy import shapes

        if image_size != shapes.IMAGE_SIZE:  # every rank, before training: not at the first checkpoint
            raise ValueError(f"distill.validation: the student makes {image_size} px images and the shapes "
                             f"evaluator reads {shapes.IMAGE_SIZE} px ones; set distill.validation.num_prompts: 0")
        self.cfg = cfg
        v = cfg.distill.validation
        self.num_prompts, self.key, self.lower_is_better = v.num_prompts, v.score_key, v.mode == "min"
        self.samples = shapes.validation_prompts(v.num_prompts)
        self.seeds = [cfg.evaluate.seed + i for i in range(v.num_prompts)]
        self.rank, self.world, self.batch_size = rank, world, v.batch_size
        self.schedule = cfg.schedule()
        self._scorer = None
        self.last_samples = (None, None)  # rank 0: the last scoring's first images and their captions

    def restore(self, record: dict | None) -> dict:
        """The choice a checkpoint carried, if this definition chooses the same way. Its `best`
        always names the exported weights, so a changed metric starts the choice afresh (the
        next score replaces the export), and a changed prompt count drops the scores too (FD
        depends on n). So does an export whose record names another step: an attempt stopped
        after exporting and before its checkpoint, or while exporting (the record goes last)."""
        fresh = {"num_prompts": self.num_prompts, "best": None, "history": []}
        if not record:
            return fresh
        if record.get("num_prompts") != self.num_prompts:
            log.info(f"validation.num_prompts changed ({record.get('num_prompts')} -> {self.num_prompts}): "
                     "earlier scores are not comparable; the choice starts afresh")
            return fresh
        if record["best"] is not None and record["best"]["metric"] != self.key:
            log.info(f"validation.metric changed ({record['best']['metric']} -> {self.key}): the choice starts "
                     "afresh; the next checkpoint's student replaces the export")
            return {**fresh, "history": list(record["history"])}
        best = record["best"]
        if best is not None and (self.exported_record() or {}).get("best") != best:
            log.info(f"the export does not hold step {best['step']}, the checkpoint's choice (an attempt stopped "
                     "after or while exporting): the next checkpoint's student replaces it")
            return {**record, "best": None}
        return record

    def exported_record(self) -> dict | None:
        """The export's `validation.json`, or None: rank 0 reads it and every rank receives it."""
        from pipelines.storage import read_json

        record = [None]
        if self.rank == 0:
            try:
                record[0] = read_json(f"{student_dir(self.cfg)}/{RECORD_FILE}", self.cfg.resources)
            except ValueError:  # cut short by a stopped attempt: names no step
                pass
        if self.world > 1:
            torch.distributed.broadcast_object_list(record, src=0)
        return record[0]

    def scores(self, nets) -> dict[str, float]:
        from swd_core.evaluate_model import ShapesScorer, sample_images

        share = slice(self.rank, None, self.world)  # worker r samples prompts r, r + world, ...
        with nets.student_sampler() as student:
            images = sample_images(student, [s.caption for s in self.samples[share]], self.seeds[share],
                                   batch_size=self.batch_size, schedule=self.schedule)
        shares = [None] * self.world
        torch.distributed.all_gather_object(shares, images)
        out = [None]
        if self.rank == 0:
            images = torch.stack([shares[i % self.world][i // self.world] for i in range(len(self.samples))])
            if self._scorer is None:  # real renders and the classifier, once
                self._scorer = ShapesScorer(self.samples)
            scores, _ = self._scorer.score(images)
            from pipelines.tracking import SAMPLE_ROWS

            self.last_samples = (images[:SAMPLE_ROWS].cpu(), [s.caption for s in self.samples[:SAMPLE_ROWS]])
            out = [{"val_fd": scores["fd"], "val_fd_mean_term": scores["fd_mean_term"],
                    "val_prompt_accuracy": scores["prompt_accuracy"]}]
        torch.distributed.broadcast_object_list(out, src=0)
        return out[0]

    def improves(self, value: float, best: dict | None) -> bool:
        """Better than `best`; a tie goes to the later step (as Ray ranks checkpoints); a
        non-finite score never wins and never stays chosen against a finite one."""
        if not math.isfinite(value):
            return best is None
        if best is None or not math.isfinite(best["value"]):
            return True
        return value <= best["value"] if self.lower_is_better else value >= best["value"]

    def choose(self, step: int, nets, chosen: dict, export: Callable[..., None]) -> dict[str, float]:
        """Score the student at `step` and add it to `chosen` (the best step and every score);
        on a better score `export(validation=chosen)` replaces the export (called on every rank), else only
        the export's `validation.json` is rewritten. Returns the metrics to report."""
        scores = self.scores(nets)
        value = scores[self.key]
        improved = self.improves(value, chosen["best"])
        chosen["history"].append({"step": step, **scores})
        if improved:
            chosen["best"] = {"step": step, "metric": self.key, "value": value}
        log.info(f"validation at step {step}: fd {scores['val_fd']:.4g} (mean term {scores['val_fd_mean_term']:.3g}), "
                 f"accuracy {scores['val_prompt_accuracy']:.3f} | "
                 + ("best so far: exporting" if improved else f"best stays step {chosen['best']['step']}"))
        if improved:
            export(validation=chosen)
        elif self.rank == 0:
            write_record(student_dir(self.cfg), chosen, self.cfg.resources)
        return {**scores, "val_best_step": chosen["best"]["step"]}

    def announce(self, chosen: dict) -> None:
        """After training: which step the export holds, and why."""
        best = chosen["best"]
        if best is not None:
            log.info(f"the exported student is step {best['step']} of {self.cfg.distill.steps}, chosen by "
                     f"{best['metric']} {best['value']:.4g} on {self.num_prompts} validation prompts")
