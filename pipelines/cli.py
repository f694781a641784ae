"""`swd`: one command for everything the project's scripts do.

    swd run     --config my.yaml [--stages distill,evaluate] [--set distill.steps=600 ...]
    swd plan    --config my.yaml [--set ...]            # the resolved plan, nothing runs
    swd serve   --config my.yaml [--set ...]            # the deploy stage
    swd retrain --config my.yaml [--once | status | rollback [--to N]]
    swd render  --config my.yaml --kind rayjob|raycluster|rayservice|raycronjob|cronjob|cache|launcher ...
    swd schema [--markdown]                             # the definition's JSON Schema (or docs/configuration.md)

`python pipelines/distill.py`, `python pipelines/retrain.py` and `python -m pipelines.cluster`
keep working (`ray job submit -- python pipelines/distill.py ...` is the cluster form); each `swd`
subcommand passes its arguments to one of them.
"""

from __future__ import annotations

import argparse
import json
import sys


def _stage_args(args: argparse.Namespace) -> list[str]:
    out = ["--config", args.config]
    for item in args.set:
        out += ["--set", item]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # retrain and render hand everything after them to their own parsers (their --help included)
    if argv and argv[0] == "retrain":
        from pipelines.retrain import main as retrain

        return retrain(argv[1:])
    if argv and argv[0] == "render":
        from pipelines.cluster.cli import main as cluster

        return cluster(["render", *argv[1:]])
    from pipelines.schema import add_set_argument

    parser = argparse.ArgumentParser(prog="swd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", default="pipelines/configs/toy.yaml", help="pipeline definition (default: the toy)")
        add_set_argument(p)
        return p

    run = stage_parser("run", "run the definition's stages (python pipelines/distill.py)")
    run.add_argument("--stages", help="comma-separated stages instead of the definition's list")
    stage_parser("plan", "print the resolved plan and exit (--dry-run)")
    stage_parser("serve", "deploy the exported student with Ray Serve (the deploy stage)")
    for name, help in (("retrain", "scheduled retraining (python pipelines/retrain.py); its arguments follow"),
                       ("render", "cluster manifests (python -m pipelines.cluster render); its arguments follow")):
        sub.add_parser(name, help=help, description=help)  # listed in --help; dispatched above
    schema = sub.add_parser("schema",
                            help="print the pipeline definition's JSON Schema (for editors' YAML completion)")
    schema.add_argument("--markdown", action="store_true",
                        help="print the configuration reference instead "
                             "(docs/configuration.md; `make docs` writes it)")
    args = parser.parse_args(argv)

    if args.command == "run":
        from pipelines.distill import main as distill

        return distill(_stage_args(args) + (["--stages", args.stages] if args.stages else []))
    if args.command == "plan":
        from pipelines.distill import main as distill

        return distill(_stage_args(args) + ["--dry-run"])
    if args.command == "serve":
        from pipelines.distill import main as distill

        return distill(_stage_args(args) + ["--stages", "deploy"])
    if args.markdown:
        from pipelines.schema_docs import render_markdown

        sys.stdout.write(render_markdown())
        return 0
    from pipelines.schema import PipelineConfig

    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
