#!/usr/bin/env python
"""Scheduled retraining of a pipeline definition with a `retrain` section (docs/retrain.md).

    python pipelines/retrain.py --config my.yaml            # cycles on retrain.schedule until stopped
    python pipelines/retrain.py --config my.yaml --once     # one cycle now (what a CronJob submits)
    python pipelines/retrain.py status --config my.yaml     # versions, metrics, promotions
    python pipelines/retrain.py rollback --config my.yaml [--to N]
    python pipelines/retrain.py --config my.yaml --once --set retrain.steps=8   # any field, as distill.py takes it

A cycle: new rows of data.sources into the shared store -> the champion trained
retrain.steps further -> candidate and champion scored on the same prompts and seeds ->
a registered version (MLflow), promoted to `champion` only when the gate passes -> the Serve app
follows the champion. One cycle per definition at a time: a second exits with the lock's holder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see pipelines/distill.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.logs import add_verbosity_arguments, apply_verbosity, logger  # noqa: E402
from pipelines.ray_runtime import quiet_output  # noqa: E402
from pipelines.schema import PipelineConfigError, add_set_argument, load_pipeline_config  # noqa: E402
from pipelines.stopping import stoppable  # noqa: E402

EXIT_LOCKED = 3  # another cycle of the definition holds the lock
log = logger("pipelines.retrain")  # not __name__: run as a script, this module is __main__


def _load(path: str, overrides: list[str] = ()):
    cfg = load_pipeline_config(path, overrides)
    if cfg.retrain is None:
        raise PipelineConfigError(f"{path}: no `retrain` section; "
                                  "add one to retrain this definition (docs/retrain.md)")
    return cfg


def once(path: str, force: bool = False, overrides: list[str] = ()) -> int:
    from pipelines.plan import plan_problems
    from pipelines.retraining.cycle import CycleRefused, run_cycle

    cfg = _load(path, overrides)
    if problems := plan_problems(cfg):  # as a pipeline job does, before anything runs
        raise PipelineConfigError("\n".join(problems))
    quiet_output()
    try:
        run_cycle(cfg, force=force)
    except CycleRefused as err:
        log.error(str(err))
        return EXIT_LOCKED
    return 0


def next_tick(schedule: str, timezone: str, after: datetime | None = None) -> datetime:
    from zoneinfo import ZoneInfo

    from croniter import croniter

    now = after or datetime.now(ZoneInfo(timezone))
    return croniter(schedule, now).get_next(datetime)


def scheduler(path: str, overrides: list[str] = ()) -> int:
    """Run a cycle at every tick of retrain.schedule. The definition is read again before each
    cycle, so sources added to it (or a changed gate) apply from the next one. A failed cycle is
    reported and the scheduler waits for the next tick: the unfinished cycle resumes then."""
    from pipelines.retraining.cycle import CycleRefused, run_cycle

    quiet_output()
    cfg = _load(path, overrides)
    while True:
        tick = next_tick(cfg.retrain.schedule, cfg.retrain.timezone)
        log.info(f"next cycle of {cfg.name} at {tick.isoformat()} ({cfg.retrain.schedule!r}, {cfg.retrain.timezone})")
        while (left := (tick - datetime.now(tick.tzinfo)).total_seconds()) > 0:
            time.sleep(min(left, 30.0))
        try:
            cfg = _load(path, overrides)
            run_cycle(cfg)
        except CycleRefused as err:
            log.warning(str(err))
        except PipelineConfigError as err:
            log.error(f"the definition no longer validates; skipping this tick:\n{err}")
        except Exception:  # noqa: BLE001 - one failed cycle must not end the schedule
            log.exception("the cycle failed; it resumes at the next tick")


def status(path: str, overrides: list[str] = ()) -> int:
    from pipelines.retraining.cycle import cycles_root, lock_uri, next_cycle
    from pipelines.retraining.lease import read_lease
    from pipelines.retraining.registry import Registry

    cfg = _load(path, overrides)
    registry = Registry(cfg)
    print(f"{cfg.name}: registry {registry.uri}, model {registry.name!r}; cycles under {cycles_root(cfg)}")
    print(f"schedule {cfg.retrain.schedule!r} ({cfg.retrain.timezone}); next tick "
          f"{next_tick(cfg.retrain.schedule, cfg.retrain.timezone).isoformat()}")
    versions = registry.versions()
    if not versions:
        print("no versions yet: run a cycle (--once)")
    else:
        names = [m.name for m in cfg.retrain.gate.metrics]
        head = f"{'version':<9}{'cycle':<12}{'rows':>6}{'new':>6}{'step':>6}  " + "".join(f"{n:>16}" for n in names)
        print(head + "  gate     created (UTC)")
        for v in versions:
            m = v.metrics
            mark = "*" if v.aliases else " "
            print(f"{mark}v{v.number:<7}{v.tags.get('cycle', '?'):<12}{v.tags.get('rows', '?'):>6}"
                  f"{v.tags.get('new_rows', '?'):>6}{v.tags.get('step', '?'):>6}  "
                  + "".join(f"{m[n]:>16.4f}" if n in m else f"{'-':>16}" for n in names)
                  + f"  {v.tags.get('gate', '?'):<8} {time.strftime('%Y-%m-%d %H:%M', time.gmtime(v.created))}")
        print("* champion")
    history = registry.alias_history()
    if history:
        print("champion history:")
        for h in history:
            was = f" (was v{h['previous']})" if h.get("previous") else ""
            print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(h['at']))}  v{h['version']}{was}: {h['why']}")
    cycle, record = next_cycle(cfg)
    holder = read_lease(lock_uri(cfg), cfg.resources)
    if holder and holder.get("expires", 0) > time.time():
        print(f"running: {cycle}, held by {holder.get('holder')}")
    elif record is not None:
        print(f"unfinished: {cycle} (started {time.strftime('%Y-%m-%d %H:%M', time.gmtime(record['started']))}); "
              "the next cycle resumes it")
    return 0


def rollback_command(path: str, to: int | None, overrides: list[str] = ()) -> int:
    from pipelines.retraining.cycle import rollback

    rollback(_load(path, overrides), to)
    return 0


def main(argv: list[str] | None = None) -> int:
    return stoppable("[retrain]", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    config_help = "pipeline definition (YAML) with a `retrain` section"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)  # before or after the command
    add_set_argument(common, default=argparse.SUPPRESS)  # --set before the command stays when none follows it
    parser = argparse.ArgumentParser(prog="pipelines/retrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=config_help)
    add_set_argument(parser)
    parser.add_argument("--once", action="store_true", help="run one cycle now and exit")
    parser.add_argument("--force", action="store_true", help="with --once: train even without new rows")
    add_verbosity_arguments(parser)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("status", parents=[common], help="print the version history")
    rb = sub.add_parser("rollback", parents=[common], help="move `champion` back; serving follows")
    rb.add_argument("--to", type=int, help="version number (default: the one promoted before the champion)")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config is required")
    try:
        apply_verbosity(args)
    except ValueError as err:  # a bad SWD_LOG_LEVEL
        parser.error(str(err))
    try:
        if args.command == "status":
            return status(args.config, args.set)
        if args.command == "rollback":
            return rollback_command(args.config, args.to, args.set)
        return once(args.config, args.force, args.set) if args.once else scheduler(args.config, args.set)
    except (PipelineConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
