"""Evaluate stage: the teacher with CFG, the teacher at the student's step count without CFG and
the exported student, on the same held-out prompts and seeds -> metrics, latency, a comparison
grid, `report.json` and `report.md` in <run_dir>/eval/ (docs/evaluate.md).

On the toy shapes domain every model gets prompt accuracy (per attribute) and the Fréchet
distance to real renders of the same prompts; on any other domain (a real SD3.5 teacher) those
metrics mean nothing. `evaluate.metrics` adds, in any domain, CLIP score, PickScore and the
Fréchet distance of DINOv2 features (swd_core.image_metrics), each with a bootstrap interval
over prompts and paired differences between the models (swd_core.bootstrap). Without an
exported student the teacher is evaluated alone and the report says how to make one. Runs as one
Ray task sampling in batches; the latency it reports is that machine's.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.logs import logger
from pipelines.report import render_markdown
from pipelines.schema import PipelineConfig
from pipelines.storage import filesystem, local_copy, write_bytes, write_png
from swd_core.adapters import FAMILIES, load_adapter
from swd_core.bootstrap import Reading, estimate, paired_difference, win_rate
from swd_core.evaluate_model import ShapesScorer, latency_split, load_exported_student, sample_images
from swd_core.export import read_schedule
from swd_core.generate import to_pil
from swd_core.grid import image_grid
from swd_core.toy import shapes

log = logger(__name__)


@dataclass
class Model:
    """One column of the report: a model and how it samples."""

    name: str  # row name as in bench/paper_tables.py: teacher_28_cfg, teacher_4, swd_4
    role: str  # teacher_cfg | teacher_few_step | student
    label: str
    steps: int
    guidance: float
    n: int  # prompts it is evaluated on (a prefix of the held-out list)
    sampling: dict = field(repr=False)  # kwargs of swd_core.generate.generate_latents

    def describe(self) -> dict:
        schedule = self.sampling.get("schedule")
        sampler = ("euler" if schedule is None else "scale-wise" if schedule.is_scalewise else "full-resolution")
        out = {"name": self.name, "role": self.role, "label": self.label, "steps": self.steps,
               "guidance": self.guidance, "sampler": sampler, "n_prompts": self.n}
        if schedule is not None:
            out["scales"], out["sigmas"] = list(schedule.scales), list(schedule.sigmas)
        return out


def student_folder(uri: str, cfg: PipelineConfig) -> str | None:
    """A local copy of the exported student (`local_copy`: downloaded again when the export
    changed), or None when there is none at `uri`."""
    folder = local_copy(uri, cfg.resources)
    return str(folder) if folder.exists() else None


def eval_prompts(cfg: PipelineConfig, domain: str, wanted: int) -> tuple[list[str], list, str, list[str]]:
    """(prompts, shapes samples or [], where they came from, notes)."""
    notes = []
    if domain == "shapes":
        available = len(shapes.held_out_prompts())
        if wanted > available:
            raise ValueError(f"evaluate: asked for {wanted} prompts but the shapes held-out set has {available}; "
                             f"lower evaluate.num_prompts / evaluate.teacher_num_prompts")
        samples = shapes.held_out_prompts()[:wanted]
        return [s.caption for s in samples], samples, f"shapes held-out set (first {wanted} of {available})", notes
    if cfg.data.eval_prompts:
        from pipelines.sources import read_prompts

        prompts, source = read_prompts(cfg.data.eval_prompts, cfg.resources), cfg.data.eval_prompts
    else:
        prompts, source = list(cfg.data.preview_prompts), "data.preview_prompts (data.eval_prompts is not set)"
    if not prompts:
        raise ValueError(f"evaluate: no prompts in {source}")
    if len(prompts) < wanted:
        notes.append(f"{source} has {len(prompts)} prompts; evaluated all of them instead of {wanted}")
    return prompts[:wanted], [], source, notes


def source_images(cfg: PipelineConfig, scorer: ShapesScorer | None, n: int) -> tuple[object, str | None]:
    """(the prompts' own images, the first `n`, or None; where they come from): real renders in
    the shapes domain, the `image` column of a Parquet `data.eval_prompts`, else none."""
    if scorer is not None:
        return scorer.real[:n], "real renders of the shapes prompts"
    if not cfg.data.eval_prompts:
        return None, None
    import io

    from PIL import Image

    from pipelines.sources import read_prompts_and_images

    _, images = read_prompts_and_images(cfg.data.eval_prompts, cfg.resources)
    if images is None:
        return None, None
    return ([Image.open(io.BytesIO(b)).convert("RGB") for b in images[:n]],
            f"the `image` column of {cfg.data.eval_prompts}")


def metric_model_paths(cfg: PipelineConfig) -> dict:
    """`evaluate.metric_models`, an s3:// folder replaced by its local copy (`from_pretrained` reads files)."""
    return {k: str(local_copy(v, cfg.resources)) if v.startswith("s3://") else v
            for k, v in cfg.evaluate.metric_models.model_dump().items()}


def chosen_by_validation(student_uri: str, cfg: PipelineConfig) -> dict | None:
    """How the distill stage chose this export (`distill.validation`): the `validation.json`
    beside `merged/`, summarized; None for an export of the last step."""
    uri = student_uri.rstrip("/").rsplit("/", 1)[0] + "/validation.json"
    fs = filesystem(uri, cfg.resources)
    if not fs.exists(uri):
        return None
    record = json.loads(fs.cat_file(uri))
    best = record.get("best")
    if not best:
        return None
    return {**best, "candidates": [h["step"] for h in record.get("history", [])]}


def training_curves(student_uri: str, cfg: PipelineConfig) -> str | None:
    """The distill run's curves.png beside `merged/` as report.md links it (relative for the run's
    own student), or None without one."""
    uri = student_uri.rstrip("/").rsplit("/", 1)[0] + "/curves.png"
    if not filesystem(uri, cfg.resources).exists(uri):
        return None
    return "../student/curves.png" if uri == f"{cfg.run_dir}/student/curves.png" else uri


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def evaluate_models(adapter, models: list[Model], prompts: list[str], seeds: list[int], cfg: PipelineConfig,
                    scorer: ShapesScorer | None, metrics=None) -> tuple[dict, dict]:
    """Sample, score and time each model on one loaded adapter; returns (results, images).
    With `metrics` (swd_core.image_metrics.ImageMetrics) each model's per-prompt readings go to
    `_readings`, read before the images are dropped."""
    results, images = {}, {}
    for m in models:
        start = time.perf_counter()

        def progress(done, m=m, start=start):
            rate = (time.perf_counter() - start) / done
            log.info(f"{m.name}: {done}/{m.n} images, {rate:.3f} s/image, ~{rate * (m.n - done):.0f} s left")

        imgs = sample_images(adapter, prompts[:m.n], seeds[:m.n], batch_size=cfg.evaluate.batch_size,
                             progress=progress, **m.sampling)
        res = {**m.describe(), "seconds_per_image_batched": (time.perf_counter() - start) / m.n}
        if scorer is not None:
            scores, feats = scorer.score(imgs)
            res.update(scores)
            res["_features"] = feats
        if metrics is not None:
            res["_readings"] = metrics.read(imgs, prompts[:m.n])
        res["latency"] = latency_split(adapter, prompts[0], seeds[0], repeats=cfg.evaluate.latency_repeats,
                                       **m.sampling)
        lat = res["latency"]
        log.info(f"{m.name}: latency {lat['total_s']:.3f} s/image (text {lat['text_s']:.3f}, transformer "
                 f"{lat['transformer_s']:.3f}, VAE {lat['vae_s']:.3f})"
                 + (f"; accuracy {res['prompt_accuracy']:.3f}, FD {res['fd']:.3f} "
                    f"(mean shift {res['fd_mean_term']:.3f}, n={res['fd_n']})" if scorer else ""))
        results[m.name] = res
        images[m.name] = imgs[:cfg.evaluate.grid_prompts]
    return results, images


def image_metric_report(results: dict, models: list[Model], ev, device: str, source: np.ndarray | None) -> list[dict]:
    """Every model's image metrics with their intervals (`image_metrics`), its paired difference
    to the guided teacher (`vs_teacher`) and PickScore win rate against it; returns the list of
    paired differences (each row against the guided teacher, and the student against the
    few-step teacher). `source`: DINOv2 features of the prompts' own images, or None."""
    opts = dict(resamples=ev.bootstrap_resamples, level=ev.confidence)
    reference = models[0]  # the guided teacher: the images fd_dinov2 compares with
    teacher_feats = results[reference.name]["_readings"].get("dinov2")
    readings = {}
    for m in models:
        raw, own = results[m.name].pop("_readings"), {}
        for name in ("clip_score", "pickscore"):
            if name in raw:
                own[name] = Reading(values=raw[name])
        if "dinov2" in raw:
            if m is not reference:
                n = min(len(raw["dinov2"]), len(teacher_feats))
                own["fd_dinov2"] = Reading(features=raw["dinov2"][:n], reference=teacher_feats[:n])
            if source is not None:
                n = min(len(raw["dinov2"]), len(source))
                own["fd_dinov2_source"] = Reading(features=raw["dinov2"][:n], reference=source[:n])
        readings[m.name] = own
        results[m.name]["image_metrics"] = {k: estimate(r, device=device, **opts).as_dict() for k, r in own.items()}
        if "dinov2" in raw and m is reference:
            results[m.name]["image_metrics"]["fd_dinov2"] = None  # the reference itself

    def compare(a: Model, b: Model) -> dict:
        ra, rb = readings[a.name], readings[b.name]
        out = {"model": a.name, "baseline": b.name,
               "difference": {k: paired_difference(ra[k], rb[k], device=device, **opts).as_dict()
                              for k in ra if k in rb}}
        if "pickscore" in ra:
            out["pickscore_win_rate"] = win_rate(ra["pickscore"].values, rb["pickscore"].values, **opts).as_dict()
        return out

    pairs = [(m, reference) for m in models[1:]]
    by_role = {m.role: m for m in models}
    if "student" in by_role:
        pairs.append((by_role["student"], by_role["teacher_few_step"]))
    differences = [compare(a, b) for a, b in pairs]
    for d in differences:
        if d["baseline"] == reference.name:
            results[d["model"]]["vs_teacher"] = d["difference"]
            if "pickscore_win_rate" in d:
                results[d["model"]]["pickscore_win_rate"] = d["pickscore_win_rate"]
    return differences


def checks(results: dict, models: list[Model], shapes_domain: bool) -> list[dict]:
    """Pass/fail of the student against the baselines. The first two are what `make run` must
    show; the others are the paper-table targets, reported for orientation."""
    by_role = {m.role: results[m.name] for m in models}
    s, few, cfg_t = by_role.get("student"), by_role.get("teacher_few_step"), by_role.get("teacher_cfg")
    if s is None:
        return []
    out = []

    def add(key, text, passed, detail):
        out.append({"id": key, "check": text, "passed": bool(passed), "detail": detail})

    if shapes_domain:
        add("student_beats_teacher_few_step_accuracy", f"{s['name']} beats {few['name']} on prompt accuracy",
            s["prompt_accuracy"] > few["prompt_accuracy"],
            f"{s['prompt_accuracy']:.3f} vs {few['prompt_accuracy']:.3f}")
        add("student_beats_teacher_few_step_fd", f"{s['name']} beats {few['name']} on FD (both n={s['fd_n']})",
            s["fd"] < few["fd"], f"{s['fd']:.3f} vs {few['fd']:.3f}")
        ratio = s["prompt_accuracy"] / cfg_t["prompt_accuracy"] if cfg_t["prompt_accuracy"] else float("inf")
        add("student_accuracy_vs_teacher_cfg", f"{s['name']} reaches >= 90% of {cfg_t['name']}'s prompt accuracy",
            ratio >= 0.9, f"{s['prompt_accuracy']:.3f} / {cfg_t['prompt_accuracy']:.3f} = {ratio:.2f}")
        fd_ratio = s["fd_common"] / cfg_t["fd_common"]
        add("student_fd_vs_teacher_cfg",
            f"{s['name']}'s FD within 1.5x of {cfg_t['name']}'s (both n={s['fd_common_n']})",
            fd_ratio <= 1.5, f"{s['fd_common']:.3f} / {cfg_t['fd_common']:.3f} = {fd_ratio:.2f}")
    lat_ratio = s["latency"]["total_s"] / cfg_t["latency"]["total_s"]
    add("student_latency_vs_teacher_cfg", f"{s['name']}'s latency <= 1/10 of {cfg_t['name']}'s",
        lat_ratio <= 0.1, f"{s['latency']['total_s']:.3f} s / {cfg_t['latency']['total_s']:.3f} s = {lat_ratio:.3f}")
    return out


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def run(cfg: PipelineConfig) -> dict:
    """The stage: one Ray task holding `evaluate.cpus` / `evaluate.gpus`, so the models run where
    the definition put them, not in the driver (on a cluster, the head node without a GPU)."""
    from pipelines.placement import run_as_task
    from pipelines.tracking import log_evaluation

    ev = cfg.evaluate
    out = run_as_task("evaluate", evaluate_here, cfg, cpus=ev.cpus, gpus=ev.gpus)
    log_evaluation(cfg, out)  # into the run's MLflow run, when the distill stage tracked one
    return out


def evaluate_here(cfg: PipelineConfig) -> dict:
    """The evaluation in this process, on the device `evaluate.gpus` names (`run` is the stage)."""
    from pipelines.placement import stage_device

    started = time.perf_counter()
    ev, t = cfg.evaluate, cfg.teacher
    out_dir = f"{cfg.run_dir}/eval"
    domain = cfg.evaluation_domain()
    # Noise comes from per-seed CPU generators (swd_core.generate), so images are the same on either device.
    device = stage_device("evaluate", "evaluate.gpus", ev.gpus)
    student_uri = ev.student or f"{cfg.run_dir}/student/merged"
    n_few, n_cfg = ev.num_prompts, ev.teacher_num_prompts or ev.num_prompts
    prompts, samples, source, notes = eval_prompts(cfg, domain, max(n_few, n_cfg))
    n_few, n_cfg = min(n_few, len(prompts)), min(n_cfg, len(prompts))
    seeds = [ev.seed + i for i in range(len(prompts))]
    scorer = ShapesScorer(samples) if domain == "shapes" else None
    if scorer is None and not ev.metrics:
        notes.append(f"domain {domain!r} (teacher {t.path}): prompt accuracy and FD need the shapes evaluator, "
                     "which only reads the toy shapes domain; this report has latency and the grid only (select "
                     "image metrics in evaluate.metrics: clip_score, pickscore, fd_dinov2)")
    metrics = None
    if ev.metrics:
        from swd_core.image_metrics import ImageMetrics

        metrics = ImageMetrics(ev.metrics, metric_model_paths(cfg), device=device, batch_size=ev.metric_batch_size)

    student_dir = student_folder(student_uri, cfg)
    if student_dir is None:
        msg = (f"no exported student at {student_uri}: evaluating the teacher only. Make one with the distill "
               f"stage (python pipelines/distill.py --config <your.yaml> --stages distill) or point "
               f"evaluate.student at an exported folder")
        log.warning(msg)
        notes.append(msg)
        record, n_steps = None, cfg.schedule().num_steps
    else:
        record = read_schedule(student_dir)  # refuses a folder that is not an export, before any sampling
        n_steps = len(record["scales"])
    chosen = chosen_by_validation(student_uri, cfg)
    curves = training_curves(student_uri, cfg)
    # an embedded guidance (FLUX.1-dev) is fed by the few-step teacher too: "unguided" only without one
    guidance = FAMILIES[t.family].guidance_label
    unguided = "no cfg" if guidance == "cfg" else f"default {guidance}"
    models = [
        Model(f"teacher_{ev.teacher_steps}_cfg", "teacher_cfg",
              f"teacher {ev.teacher_steps} steps, {guidance} {ev.teacher_guidance_scale:g}",
              ev.teacher_steps, ev.teacher_guidance_scale, n_cfg,
              dict(teacher_steps=ev.teacher_steps, guidance=ev.teacher_guidance_scale)),
        Model(f"teacher_{n_steps}", "teacher_few_step",
              f"teacher {n_steps} steps, {unguided}", n_steps, 0.0, n_few,
              dict(teacher_steps=n_steps, guidance=0.0)),
    ]
    log.info(f"{domain} domain, prompts from {source}; models: "
             + ", ".join(f"{m.name} ({m.n} prompts)" for m in models)
             + (f", student from {student_uri} ({n_few} prompts)" if record else ""))
    # One model in memory at a time: the teacher, then the student (matters at SD3.5 sizes).
    teacher = load_adapter(t.family, t.path, dtype=t.dtype, device=device, max_sequence_length=t.max_sequence_length)
    results, images = evaluate_models(teacher, models, prompts, seeds, cfg, scorer, metrics)
    del teacher
    gc.collect()
    if record is not None:
        student, schedule, _ = load_exported_student(student_dir, t.family, t.dtype, device)
        kind = "swd" if schedule.is_scalewise else "fullres"
        sm = Model(f"{kind}_{n_steps}", "student",
                   f"student, {'scale-wise' if schedule.is_scalewise else 'full-res'} {n_steps} steps",
                   n_steps, 0.0, n_few, dict(schedule=schedule))
        models.append(sm)
        r, im = evaluate_models(student, [sm], prompts, seeds, cfg, scorer, metrics)
        results.update(r)
        images.update(im)
        del student

    report = {"name": cfg.name, "domain": domain, "teacher": t.path, "device": device, "machine": machine(),
              "placement": {"device": device, "pid": os.getpid(), "node": _node_id()},
              "student": {"uri": student_uri, "found": record is not None, "schedule": record, "chosen": chosen,
                          "curves": curves},
              "prompts": {"source": source, "seeds": f"{ev.seed} + prompt index, the same in every model"},
              "notes": notes}
    if scorer is not None:
        n_common = min(m.n for m in models)
        for res in results.values():
            feats = res.pop("_features")
            res["fd_common"], res["fd_common_n"] = scorer.fd(feats[:n_common]), n_common
        report["classifier_real_accuracy"] = scorer.real_accuracy["prompt_accuracy"]
        report["fd_floor"] = {str(n): scorer.fd_floor(n) for n in sorted({m.n for m in models} | {n_common})}
    if metrics is not None:
        src, src_from = (source_images(cfg, scorer, max(m.n for m in models)) if "fd_dinov2" in ev.metrics
                         else (None, None))
        source = metrics.reference_features(src) if src is not None else None
        report["image_metrics"] = {
            "metrics": list(ev.metrics), "models": metric_model_paths(cfg), "level": ev.confidence,
            "resamples": ev.bootstrap_resamples, "reference": models[0].name, "source_images": src_from,
            "differences": image_metric_report(results, models, ev, device, source)}
    report["models"] = [results[m.name] for m in models]
    report["checks"] = checks(results, models, scorer is not None)

    rows = min(ev.grid_prompts, min(m.n for m in models))
    columns = ([("real render", to_pil(scorer.real[:rows]))] if scorer is not None else []) + \
              [(m.label, to_pil(images[m.name][:rows])) for m in models]
    title = f"{cfg.name}: same prompts and seeds in every column"
    if scorer is not None:  # one line must fit the grid's width
        title = cfg.name + "".join(f" | {m.name}: acc {results[m.name]['prompt_accuracy']:.2f} "
                                   f"FD {results[m.name]['fd']:.2f} n={m.n}" for m in models)
    grid = image_grid([[col[i] for _, col in columns] for i in range(rows)], prompts[:rows],
                      [label for label, _ in columns], title=title)
    report["seconds"] = time.perf_counter() - started
    paths = {"grid": write_png(f"{out_dir}/grid.png", grid, cfg.resources)}
    report["outputs"] = {"report_json": f"{out_dir}/report.json", "report_md": f"{out_dir}/report.md",
                         "grid": f"{out_dir}/grid.png"}
    paths["report_md"] = write_bytes(f"{out_dir}/report.md", render_markdown(report).encode(), cfg.resources)
    paths["report_json"] = write_bytes(f"{out_dir}/report.json", (json.dumps(report, indent=2) + "\n").encode(),
                                       cfg.resources)
    for c in report["checks"]:
        log.info(f"{'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['detail']}")
    log.info(f"report: {paths['report_md']}")
    log.info(f"report.json: {paths['report_json']}")
    log.info(f"grid: {paths['grid']}  ({report['seconds']:.0f} s)")
    return {**paths, "student_found": record is not None, "checks": {c["id"]: c["passed"] for c in report["checks"]},
            "seconds": report["seconds"], "device": device}
