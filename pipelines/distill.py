#!/usr/bin/env python
"""Run a SwD pipeline definition.

    python pipelines/distill.py --config pipelines/configs/toy.yaml [--dry-run] [--stages preview] \
        [--set distill.steps=600 --set resources.num_workers=4]
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python pipelines/distill.py --config pipelines/configs/toy.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch loads: idle OpenMP threads sleep instead of spinning. On a shared or oversubscribed
# CPU (Ray workers, actors and the driver on the same cores) spinning threads slow every stage
# 5-50x; with dedicated cores the cost is negligible.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# `python pipelines/distill.py` puts pipelines/ (not the repo root) on sys.path; under
# `ray job submit --working-dir .` the package may not be installed, so add the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.logs import add_verbosity_arguments, apply_verbosity, logger  # noqa: E402
from pipelines.plan import plan_problems, render_plan  # noqa: E402
from pipelines.ray_runtime import quiet_output  # noqa: E402
from pipelines.schema import STAGES, PipelineConfigError, add_set_argument, load_pipeline_config  # noqa: E402
from pipelines.stages import AVAILABLE, run_stage  # noqa: E402
from pipelines.stopping import stoppable  # noqa: E402
from pipelines.storage import InputError  # noqa: E402

log = logger("pipelines.distill")  # not __name__: run as a script, this module is __main__


def main(argv: list[str] | None = None) -> int:
    return stoppable("[pipeline]", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline definition (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    parser.add_argument("--stages",
                        help=f"comma-separated stages to run instead of the definition's list ({', '.join(STAGES)})")
    add_set_argument(parser)
    add_verbosity_arguments(parser)
    args = parser.parse_args(argv)
    try:
        apply_verbosity(args)
    except ValueError as err:  # a bad SWD_LOG_LEVEL
        parser.error(str(err))

    try:
        cfg = load_pipeline_config(args.config, args.set)
    except PipelineConfigError as err:
        print(err, file=sys.stderr)
        return 2
    stages = cfg.stages
    if args.stages:
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in STAGES]
        if unknown:
            print(f"--stages: unknown stage(s) {unknown}; allowed: {list(STAGES)}", file=sys.stderr)
            return 2
        stages = [s for s in STAGES if s in wanted]
    planned = cfg.model_copy(update={"stages": stages})
    problems = plan_problems(planned)  # before any stage: on a cluster, the job's first seconds
    if args.dry_run:
        if args.set:
            print("overrides (--set): " + ", ".join(args.set) + "\n")
        print(render_plan(planned))
    for line in problems:
        print(line, file=sys.stderr)
    if problems or args.dry_run:
        return 2 if problems else 0

    quiet_output()
    results = {}
    for stage in stages:
        if stage not in AVAILABLE:
            log.warning("not available in this version of the project; skipped", extra={"tag": stage})
            continue
        log.info("starting", extra={"tag": stage})
        try:
            results[stage] = run_stage(stage, cfg)
        except InputError as err:  # an unusable source or storage: the message says which
            log.error(str(err), extra={"tag": stage})
            return 2
    ran = [s for s in stages if s in results]
    log.info(f"done: ran {', '.join(ran) if ran else 'no stage'}; outputs under {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
