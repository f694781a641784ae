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
from pipelines.serve.model import ServedModel, load_served, render_pngs, torch_threads
from pipelines.serve.replica import ReplicaConfig

log = logging.getLogger("ray.serve")


@serve.deployment(name="Generator")
class Generator:
    def __init__(self, settings: dict):
        quiet_libraries()  # a replica process loads (and hot-swaps) the model: no bars in its log
        self.cfg = s = ReplicaConfig.model_validate(settings)
        torch_threads(s.cpus)
        self.device = stage_device("deploy", "serve.gpus_per_replica", s.gpus)
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
            model = await asyncio.to_thread(load_served, source, model_id, self.cfg.family, self.cfg.dtype,
                                            self.cfg.resources, self.device)
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
        """One (prompt, seed) per call; Serve gathers concurrent calls into `requests`. A request
        the model fails on gets {"error": ...}; the batch's others are answered as if they had come
        alone (sampled again one by one), never failed with it."""
        model = self.model  # one model for the whole batch, even if a swap lands meanwhile
        prompts, seeds = zip(*requests)
        try:
            pngs = await asyncio.to_thread(render_pngs, model, prompts, seeds, self.pad_to)
        except Exception as err:  # noqa: BLE001 - which request caused it is found below
            if len(requests) == 1:
                return [self._failed(model, err)]
            log.warning("a batch of %d failed (%s: %s); sampling its requests one by one", len(requests),
                        type(err).__name__, err)
            return [await self._alone(model, prompt, seed) for prompt, seed in requests]
        return [self._result(model, png, len(requests)) for png in pngs]

    async def _alone(self, model: ServedModel, prompt: str, seed: int) -> dict:
        try:
            (png,) = await asyncio.to_thread(render_pngs, model, [prompt], [seed], self.pad_to)
        except Exception as err:  # noqa: BLE001 - this request's own failure, answered to it alone
            return self._failed(model, err)
        return self._result(model, png, 1)

    @staticmethod
    def _result(model: ServedModel, png: bytes, batch: int) -> dict:
        return {"png": png, "model_id": model.model_id, "source": model.source, "batch": batch}

    @staticmethod
    def _failed(model: ServedModel, err: Exception) -> dict:
        log.error("a request failed in the model: %s: %s", type(err).__name__, err)
        return {"error": f"{type(err).__name__}: {err}", "model_id": model.model_id, "source": model.source,
                "batch": 1}
