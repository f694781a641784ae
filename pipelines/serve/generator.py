"""The generator deployment: holds one exported student and samples dynamic batches of requests.

The model comes from `user_config` (`{"model": source, "model_id": id}`), so pointing a running
deployment at a newly exported student is a `reconfigure` in place: the new model loads in a
thread while the replica keeps serving the old one, then one reference swap switches them.
Batches already running finish on the model they started with; no request fails.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from pipelines.placement import stage_device
from pipelines.ray_runtime import quiet_libraries
from pipelines.schema import PipelineConfig
from pipelines.serve.model import ServedModel, load_student, render_pngs, torch_threads

log = logging.getLogger("ray.serve")


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, definition: dict):
        quiet_libraries()  # a replica process loads (and hot-swaps) the model: no bars in its log
        self.cfg = PipelineConfig.model_validate(definition)
        s = self.cfg.serve
        torch_threads(s.cpus_per_replica)
        self.device = stage_device("deploy", "serve.gpus_per_replica", s.gpus_per_replica)
        # Padding to a fixed shape only when asked: it costs max_batch_size images per batch.
        self.pad_to = s.max_batch_size if s.deterministic_batching else None
        # The decorator's numbers are placeholders; the definition's values apply here.
        self.generate.set_max_batch_size(s.max_batch_size)
        self.generate.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.model: ServedModel | None = None
        self.swap_error: str | None = None

    async def reconfigure(self, user_config: dict):
        source, model_id = user_config["model"], user_config["model_id"]
        if self.model is not None and (self.model.source, self.model.model_id) == (source, model_id):
            return
        log.info("loading model %s from %s", model_id, source)
        try:
            # Off the event loop: requests keep flowing to the current model while this loads.
            model = await asyncio.to_thread(load_student, self.cfg, source, model_id, self.device)
        except Exception as err:
            if self.model is None:
                raise  # nothing to serve: the replica fails to start, with this error in `serve status`
            # A bad new model must not take down a working one: keep serving, report it.
            self.swap_error = f"could not load {source}: {type(err).__name__}: {err}"
            log.error("hot swap failed, still serving %s: %s", self.model.source, self.swap_error)
            return
        old, self.model, self.swap_error = self.model, model, None
        log.info("now serving %s from %s (was %s)", model_id, source, old.source if old else None)

    def check_health(self):
        if self.model is None:
            raise RuntimeError("no model loaded")

    async def info(self) -> dict:
        return {**self.model.info(), "swap_error": self.swap_error}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[tuple[str, int]]) -> list[dict]:
        """One (prompt, seed) per call; Serve gathers concurrent calls into `requests`."""
        model = self.model  # one model for the whole batch, even if a swap lands meanwhile
        prompts, seeds = zip(*requests)
        pngs = await asyncio.to_thread(render_pngs, model, prompts, seeds, self.pad_to)
        return [{"png": png, "model_id": model.model_id, "source": model.source, "batch": len(requests)}
                for png in pngs]
