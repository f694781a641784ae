"""Synthesize stage (Ray Data): prompts -> teacher images (many steps, CFG) -> Parquet rows
`image` (PNG bytes), `caption`, `seed`, `num_steps`, `guidance_scale`, `teacher`.

The paper trains on teacher samples; this is how a user makes them at scale. Prompt i gets seed
`synthesize.seed + i` and all its noise from a generator of that seed (swd_core.generate), so an
image depends only on (prompt, seed), never on batching or on which actor drew it. Rows already
in the output (same caption and seed) are skipped, so a rerun or a resume only adds what is
missing. When the stage is enabled, precompute reads its output as one more source.
"""

from __future__ import annotations

import io
import time

import pyarrow as pa

from pipelines import sources, store
from pipelines.logs import logger
from pipelines.schema import PipelineConfig
from pipelines.storage import arrow_filesystem, filesystem, fs_path

log = logger(__name__)

SCHEMA = pa.schema([("image", pa.binary()), ("caption", pa.string()), ("seed", pa.int64()), ("num_steps", pa.int64()),
                    ("guidance_scale", pa.float64()), ("teacher", pa.string())])


def output_uri(cfg: PipelineConfig) -> str:
    return (cfg.synthesize.output or f"{cfg.run_dir}/synthesized").rstrip("/")


class TeacherSampler:
    """One per actor: the full teacher pipeline (sampling needs the transformer)."""

    def __init__(self, teacher: str, family: str, dtype: str, max_sequence_length: int, num_steps: int,
                 guidance: float, threads: int, gpus: float = 0.0):
        import torch

        from pipelines.placement import stage_device
        from pipelines.ray_runtime import quiet_libraries
        from swd_core.adapters import load_adapter

        quiet_libraries()  # an actor process: the driver's settings do not reach it
        torch.set_num_threads(threads)
        self.teacher, self.num_steps, self.guidance = teacher, num_steps, guidance
        device = stage_device("synthesize", "synthesize.gpus_per_actor", gpus)
        self.adapter = load_adapter(family, teacher, dtype=dtype, device=device,
                                    max_sequence_length=max_sequence_length)

    def __call__(self, batch: dict) -> pa.Table:
        from swd_core.generate import generate_images

        prompts, seeds = [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        images = generate_images(self.adapter, prompts, seeds, teacher_steps=self.num_steps, guidance=self.guidance)
        pngs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        n = len(prompts)
        return pa.table({"image": pngs, "caption": prompts, "seed": seeds, "num_steps": [self.num_steps] * n,
                         "guidance_scale": [float(self.guidance)] * n, "teacher": [self.teacher] * n}, schema=SCHEMA)


def run(cfg: PipelineConfig) -> dict:
    import ray

    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    sc, resources = cfg.synthesize, cfg.resources
    if not sc.enabled:  # in the default stage list, but only on request: sampling costs teacher time
        log.info("disabled (synthesize.enabled: false); skipped")
        return {"skipped": True}
    if not cfg.data.prompts:
        raise ValueError("synthesize: set `data.prompts` "
                         "(a text file, one prompt per line, or Parquet with a `prompt` column)")
    prompts = sources.read_prompts(cfg.data.prompts, resources)
    ensure_ray(cfg)
    out = output_uri(cfg)
    store.remove_unreadable(out, resources)  # partial files of an interrupted run
    wanted = [{"prompt": p, "seed": sc.seed + i} for i, p in enumerate(prompts)]
    done = set()
    for path in store.list_parquet(out, resources):
        import pyarrow.parquet as pq

        with filesystem(out, resources).open(path, "rb") as f:
            t = pq.read_table(f, columns=["caption", "seed", "num_steps", "guidance_scale", "teacher"])
        for r in t.to_pylist():
            if ((r["num_steps"], r["guidance_scale"], r["teacher"])
                    == (sc.num_steps, float(sc.guidance_scale), cfg.teacher.path)):
                done.add((r["caption"], r["seed"]))
    todo = [w for w in wanted if (w["prompt"], w["seed"]) not in done]
    log.info(f"{len(prompts)} prompts: {len(todo)} to sample, {len(wanted) - len(todo)} already in {out}")
    if todo:
        (ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), sc.actors * 4)))
         .map_batches(TeacherSampler, batch_size=sc.batch_size, batch_format="numpy",
                      fn_constructor_args=(cfg.teacher.path, cfg.teacher.family, cfg.teacher.dtype,
                                           cfg.teacher.max_sequence_length, sc.num_steps, sc.guidance_scale,
                                           max(1, int(sc.cpus_per_actor)), sc.gpus_per_actor),
                      compute=ray.data.ActorPoolStrategy(size=sc.actors), num_cpus=sc.cpus_per_actor,
                      num_gpus=sc.gpus_per_actor)
         .write_parquet(fs_path(out), filesystem=arrow_filesystem(out, resources)))
    rows = store.count_rows(out, resources)
    result = {"output": out, "prompts": len(prompts), "sampled": len(todo), "skipped_present": len(wanted) - len(todo),
              "rows": rows, "seconds": time.perf_counter() - start}
    log.info(f"sampled {len(todo)} images, skipped {result['skipped_present']} already present; "
             f"{out} holds {rows} rows ({result['seconds']:.1f} s)")
    return result
