"""One retraining cycle: new rows into the shared store -> the champion trained further ->
candidate and champion scored by the gate -> a registered version, promoted only when it passes
-> Serve follows the champion.

Layout under the run (`<storage>/<name>`):
    store/                     shared and incremental: a cycle encodes only rows it has not seen
    cycles/cycle-NNNN/         one immutable folder per cycle: train/ (Ray Train checkpoints),
                               student/ (the export), cycle.json (what happened), grid.png
    registry.db                MLflow's SQLite store (default; or a tracking server)
    mlflow-artifacts/          the runs' artifacts: definition, grid, gate report
    retrain.lock               held while a cycle runs (pipelines/retraining/lease.py)

A cycle stopped midway (killed, a node lost) is resumed by the next one under the same id: its
training resumes from its own checkpoints, nothing it wrote is redone or lost.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pipelines.logs import logger
from pipelines.schema import PipelineConfig
from pipelines.storage import filesystem, read_json, write_bytes

log = logger(__name__)

RECORD = "cycle.json"


class CycleRefused(RuntimeError):
    """The cycle did not run (another holds the lock); nothing changed."""


def lock_uri(cfg: PipelineConfig) -> str:
    return f"{cfg.run_dir}/retrain.lock"


def cycles_root(cfg: PipelineConfig) -> str:
    return f"{cfg.run_dir}/cycles"


def cycle_config(cfg: PipelineConfig, cycle: str, steps: int) -> PipelineConfig:
    """The definition as one cycle runs it: its own run folder (cycles/<cycle>), the run's shared
    store and synthesized data, `steps` in all (the champion's plus this cycle's steps)."""
    from pipelines.retraining.registry import model_name, tracking_uri
    from pipelines.store.store import store_uri

    update = {
        "name": cycle,
        "resources": cfg.resources.model_copy(update={"storage": cycles_root(cfg)}),
        "precompute": cfg.precompute.model_copy(update={"output": store_uri(cfg)}),
        "synthesize": cfg.synthesize.model_copy(
            update={"output": cfg.synthesize.output or f"{cfg.run_dir}/synthesized"}),
        "distill": cfg.distill.model_copy(update={"steps": steps}),
        # the distill run is the cycle's MLflow run, in the registry's store (pipelines/tracking.py)
        "tracking": cfg.tracking.model_copy(update={"enabled": True, "uri": tracking_uri(cfg),
                                                    "experiment": model_name(cfg)}),
    }
    return cfg.model_copy(update=update)


def _cycle_ids(cfg: PipelineConfig) -> list[str]:
    root = cycles_root(cfg)
    fs = filesystem(root, cfg.resources)
    if not fs.exists(root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                  if p.rstrip("/").rsplit("/", 1)[-1].startswith("cycle-"))


def next_cycle(cfg: PipelineConfig) -> tuple[str, dict | None]:
    """(id, its record so far): the last cycle again when it did not finish, else a new one."""
    ids = _cycle_ids(cfg)
    if ids:
        record = read_json(f"{cycles_root(cfg)}/{ids[-1]}/{RECORD}", cfg.resources)
        if record is None or record.get("state") != "finished":
            return ids[-1], record
    number = int(ids[-1].removeprefix("cycle-")) + 1 if ids else 1
    return f"cycle-{number:04d}", None


def _write_record(cfg: PipelineConfig, cycle: str, record: dict) -> None:
    write_bytes(f"{cycles_root(cfg)}/{cycle}/{RECORD}", json.dumps(record, indent=2).encode(), cfg.resources)


def run_cycle(cfg: PipelineConfig, *, force: bool = False) -> dict:
    """Run one cycle now under the definition's lock; raises `CycleRefused` if another holds it."""
    from pipelines.retraining.lease import Lease, LeaseHeld

    if cfg.retrain is None:
        raise ValueError("this definition has no `retrain` section: add one (docs/retrain.md) to retrain it")
    try:
        lease = Lease(lock_uri(cfg), cfg.resources, ttl_s=cfg.retrain.lock_ttl_s)
        lease.acquire()
        log.debug(f"took the lock {lock_uri(cfg)} (expires unless renewed within {cfg.retrain.lock_ttl_s} s)")
    except LeaseHeld as held:
        raise CycleRefused(f"another retraining cycle of {cfg.name!r} is running: {held}; this one exits and "
                           "changes nothing") from None
    try:
        return _run_locked(cfg, lease, force)
    finally:
        lease.release()


def _run_locked(cfg: PipelineConfig, lease, force: bool) -> dict:
    from pipelines.retraining.registry import Registry
    from pipelines.stages import distill, precompute
    from pipelines.tracking import write_run_record

    r = cfg.retrain
    registry = Registry(cfg)
    cycle, record = next_cycle(cfg)
    champion = registry.champion()
    resumed = record is not None
    record = record or {"cycle": cycle, "started": time.time(), "state": "running",
                        "champion_before": champion.number if champion else None}
    log.info(f"{cycle}{' (resumed: it did not finish)' if resumed else ''}; champion: "
         + (f"v{champion.number} ({champion.tags.get('cycle')})" if champion else "none yet"))

    # 1. new data: only rows the store has not seen are encoded
    if cfg.synthesize.enabled:
        from pipelines.stages import synthesize

        synthesize.run(cycle_config(cfg, cycle, cfg.distill.steps))
    pre = precompute.run(cycle_config(cfg, cycle, cfg.distill.steps))
    if not resumed or "new_rows" not in record:
        record.update(new_rows=pre["new_rows"], rows=pre["rows"])
    log.info(f"store: {pre['rows']} rows, {record['new_rows']} new this cycle")
    if champion is not None and not force and record["new_rows"] < r.min_new_rows:
        # nothing to learn from: no folder, no version (the record of the skip is the log)
        log.info(f"{record['new_rows']} new rows < retrain.min_new_rows {r.min_new_rows}: nothing to train; "
             "the champion stays (--force trains anyway)")
        return {"cycle": None, "skipped": True, "new_rows": record["new_rows"], "champion": champion.number}
    _write_record(cfg, cycle, record)

    # 2. train: the champion further (warm start), or from the teacher for the first version
    warm = champion.tags.get("checkpoint") if (champion is not None and r.warm_start) else None
    start_step = int(champion.tags.get("step", 0)) if warm else 0
    steps = start_step + r.steps
    ccfg = cycle_config(cfg, cycle, steps)
    run_id = record.get("mlflow_run_id") or registry.start_run(cycle)
    record.update(mlflow_run_id=run_id, warm_start=warm, start_step=start_step, steps=steps)
    _write_record(cfg, cycle, record)
    # the distill stage's rank 0 logs the cycle's definition, steps and samples into this run
    write_run_record(ccfg.run_dir, cfg.resources, registry.uri, run_id)
    if not resumed:
        registry.log_params(run_id, {"cycle": cycle, "warm_start": warm or "teacher", "start_step": start_step,
                                     "steps": steps, "rows": pre["rows"], "new_rows": record["new_rows"]})
    log.info(f"training {r.steps} steps from "
         + (f"v{champion.number}'s checkpoint at step {start_step}" if warm else "the teacher"))
    lease.check()
    trained = distill.trainer.run(ccfg, warm_start=warm)
    student = f"{trained['student']}/merged"

    # 3. the gate: candidate and champion on the same prompts and seeds
    lease.check()
    from pipelines.retraining.gate import score_in_task

    gate = _gate(cfg)
    cand, champ = score_in_task(cfg, student, champion.source if champion is not None else None)
    passed, lines, differences = gate.verdict(cand, champ)
    for line in lines:
        log.info(f"gate: {line}")
    intervals = gate.intervals(cand)  # each metric of the candidate with its interval over the gate prompts
    registry.log_metrics(run_id, {f"gate.candidate.{k}{end}": e[key] for k, e in intervals.items()
                                  for end, key in (("", "value"), (".lo", "lo"), (".hi", "hi"))})
    if champ is not None:
        registry.log_metrics(run_id, {f"gate.champion.{k}": v for k, v in champ.metrics.items()})
        registry.log_metrics(run_id, {f"gate.difference.{k}{end}": e[key] for k, e in differences.items()
                                      for end, key in (("", "value"), (".lo", "lo"), (".hi", "hi"))})
    grid = _grid(cfg, ccfg, gate, cand, champ, champion)
    registry.log_file(run_id, grid)

    # 4. a version either way; promoted only when it passes
    lease.check()
    # a cycle resumed after it registered (killed before its record said finished) registers nothing twice
    version = registry.register_cycle(cycle, student, run_id, {
        "rows": pre["rows"], "new_rows": record["new_rows"], "iterations": r.steps,
        "step": trained["final_metrics"].get("val_best_step", steps), "checkpoint": trained["export_checkpoint"],
        "metrics": json.dumps(cand.metrics), "intervals": json.dumps(intervals),
        "differences": json.dumps(differences),
        "gate": "passed" if passed else "failed", "gate_report": "\n".join(lines),
        "champion_metrics": json.dumps(champ.metrics) if champ else "",
        "warm_start_from": champion.number if warm else ""})
    if passed:
        registry.set_champion(version.number, f"{cycle}: gate passed")
        log.info(f"v{version.number} is the champion")
    else:
        log.warning(f"v{version.number} is registered, not promoted: "
                    f"the gate failed; v{champion.number} stays the champion")
    record.update(state="finished", finished=time.time(), version=version.number, promoted=passed,
                  gate={"candidate": cand.metrics, "champion": champ.metrics if champ else None, "report": lines,
                        "intervals": intervals, "differences": differences,
                        **gate.describe()},
                  student=student, checkpoint=trained["export_checkpoint"])
    _write_record(cfg, cycle, record)
    registry.log_text(run_id, json.dumps(record, indent=2), RECORD)
    registry.end_run(run_id)
    if r.serve:  # a new champion, or the first deployment (also when the app is gone)
        follow_champion(cfg, registry, deploy=True, only_if_absent=not passed)
    return record


def _gate(cfg: PipelineConfig):
    from pipelines.retraining.gate import Gate

    return Gate(cfg)


def _grid(cfg, ccfg, gate, cand, champ, champion) -> str:
    """candidate | champion, one row per gate prompt, into the cycle folder; returns a local copy."""
    from swd_core.generate import to_pil
    from swd_core.grid import image_grid


    columns = [to_pil(cand.images)] + ([to_pil(champ.images)] if champ is not None else [])
    labels = ["candidate"] + ([f"champion v{champion.number}"] if champ is not None else [])
    rows = [list(cells) for cells in zip(*columns)]
    grid = image_grid(rows, gate.prompts[:len(rows)], labels, title=f"{cfg.name} {ccfg.name}: gate prompts")
    local = os.path.join(tempfile.mkdtemp(prefix="swd-grid-"), "grid.png")  # MLflow logs files
    grid.save(local)
    write_bytes(f"{ccfg.run_dir}/grid.png", Path(local).read_bytes(), cfg.resources)
    return local


def served_model(cfg: PipelineConfig, version) -> PipelineConfig:
    """The definition with its Serve app on `version`: `<model_id>-v<N>` from the version's folder."""
    base = cfg.serve.model_id or f"{cfg.name}-swd"
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": version.source,
                                                                        "model_id": f"{base}-v{version.number}"})})


def follow_champion(cfg: PipelineConfig, registry, deploy: bool = True, only_if_absent: bool = False) -> dict | None:
    """Point the definition's Serve app at the champion: an in-place reconfigure of a running app
    (replicas load the new model and swap it in; requests keep being served), or, with `deploy`,
    a first deployment. Reconfiguring from the cycle (rather than replicas polling the registry)
    moves serving the moment the alias moves, and replicas need no registry access."""
    champion = registry.champion()
    if champion is None:
        return None
    from ray import serve

    from pipelines.ray_compat import started_ray_here
    from pipelines.ray_runtime import ensure_ray
    from pipelines.serve import app_name, build_app

    ensure_ray(cfg)
    started_ray = started_ray_here()
    served = served_model(cfg, champion)
    name = app_name(cfg)
    running = name in serve.status().applications
    if running and only_if_absent:
        return None
    if not running and not deploy:
        log.info(f"serve: no running app {name}; its next deployment serves {served.serve.model_id}")
        return None
    if not running:
        if warning := cfg.serve.exposure_warning():
            log.warning(f"serve: {warning}")
        serve.start(http_options={"host": cfg.serve.listen_host, "port": cfg.serve.port})
    serve.run(build_app(served), name=name, route_prefix=cfg.serve.route_prefix, blocking=False)
    log.info(f"serve: {name} {'now serves' if running else 'deployed with'} {served.serve.model_id} "
             f"({champion.source})")
    if started_ray:
        log.info("serve: note: this process started Ray, so the app stops when it exits; run the scheduler "
             "(pipelines/retrain.py without --once) or join a cluster (RAY_ADDRESS) for a lasting service")
    return {"app": name, "model_id": served.serve.model_id}


def previous_champion(history: list[dict], current: int) -> int | None:
    """The version the gate promoted before `current` (rollbacks are not promotions: rolling back
    twice goes two versions back, not back and forth)."""
    promoted = []
    for h in history:
        if not h["why"].startswith("rollback") and h["version"] not in promoted:
            promoted.append(h["version"])
    if current in promoted:
        i = promoted.index(current)
        return promoted[i - 1] if i > 0 else None
    earlier = [v for v in promoted if v != current]
    return earlier[-1] if earlier else None


def rollback(cfg: PipelineConfig, to: int | None = None) -> int:
    """Move `champion` back: to version `to`, or to the version promoted before the current one;
    a running Serve app follows. Returns the new champion's number."""
    from pipelines.retraining.registry import Registry

    registry = Registry(cfg)
    current = registry.champion()
    if current is None:
        raise ValueError(f"{cfg.name}: there is no champion to roll back from")
    if to is None:
        to = previous_champion(registry.alias_history(), current.number)
        if to is None:
            raise ValueError(f"{cfg.name}: no version was promoted before v{current.number}; nothing to roll back to "
                             "(give --to N)")
    known = {v.number for v in registry.versions()}
    if to not in known:
        raise ValueError(f"{cfg.name}: there is no version {to}; versions: {sorted(known)}")
    if to == current.number:
        raise ValueError(f"{cfg.name}: v{to} is already the champion")
    registry.set_champion(to, f"rollback from v{current.number}")
    log.info(f"champion: v{current.number} -> v{to}")
    if cfg.retrain and cfg.retrain.serve:
        follow_champion(cfg, registry, deploy=False)
    return to
