"""What a worker reports of each iteration: its metrics (to Ray Train, and in checkpoints) and,
every `distill.log_every` steps, the progress line rank 0 prints."""

from __future__ import annotations

import time
from typing import Callable

from pipelines.logs import logger
from pipelines.schema import PipelineConfig

log = logger(__name__)


def format_duration(seconds: float) -> str:
    """A short human duration: 45s, 12m05s, 3h07m."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    def __init__(self, cfg: PipelineConfig, rank: int, nodes: int, clock: Callable[[], float] = time.monotonic):
        self.d, self.rank, self.nodes = cfg.distill, rank, nodes
        self.scales = cfg.schedule().scales
        self.window: list[float] = []  # iteration seconds since the last progress line
        self.run_times: list[float] = []  # iteration seconds of this run (attempt)
        self.clock = clock
        self.since: tuple[int, float] | None = None  # (step, time) at the end of this run's first step

    def metrics(self, step: int, i: int, terms: dict[str, float], seconds: float, data_wait: float,
                lr: float) -> dict:
        """The metrics of iteration `step` at scale index `i` that took `seconds`."""
        d = self.d
        self.window.append(seconds)
        self.run_times.append(seconds)
        if self.since is None:
            self.since = (step, self.clock())
        return {"step": step, "scale": self.scales[i], "nodes": self.nodes, "iter_s": seconds,
                "data_wait_s": data_wait,
                # mean over this run's iterations after the first (which pays for warm-up)
                "mean_iter_s": sum(self.run_times[1:]) / max(len(self.run_times) - 1, 1),
                "samples_per_s": d.batch_size * (1 + d.fake_updates) / seconds,
                "lr": lr, **terms}

    def eta(self, step: int) -> str:
        """Time left to the last step at this run's pace since its first step, which pays for warm-up
        and is left out. Wall-clock, so checkpoints and validation count in the pace; 'unknown'
        until a step after the first has been timed."""
        if step >= self.d.steps:
            return "ETA 0s"
        if self.since is None or step <= self.since[0]:
            return "ETA unknown"
        first, t = self.since
        per_step = (self.clock() - t) / (step - first)
        return f"ETA {format_duration(per_step * (self.d.steps - step))}"

    def log(self, metrics: dict, terms: dict[str, float], save: bool) -> None:
        """The progress line, at every `log_every` steps, at checkpoints and after the first step."""
        d, step = self.d, metrics["step"]
        if step % d.log_every == 0 or save or step == 1:
            if self.rank == 0:
                line = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
                log.info(f"step {step}/{d.steps} scale {metrics['scale']} lr {metrics['lr']:.3g} | {line} | "
                         f"{sum(self.window) / len(self.window):.2f} s/it (data wait {metrics['data_wait_s']:.2f} s), "
                         f"{metrics['samples_per_s']:.1f} samples/s, {self.eta(step)}")
            self.window = []
