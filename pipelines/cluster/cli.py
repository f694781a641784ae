"""`python -m pipelines.cluster render|stage-cache`: the command line of the renderers.

Every field of the definition's `cluster` section is a flag of `render`, derived from the schema
(name, help text and type), so an option is written once: `cluster.gpu.memory` is `--gpu-memory`,
`cluster.model_cache.claim` is `--model-cache-claim`. A flag's value is read as YAML unless the
field is a string (`--gpu-node-selector '{nvidia.com/gpu.product: NVIDIA-H200}'`), and replaces
the definition's; the definition is then validated as a whole, so a bad value fails like one in
the file, naming the field.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel

from pipelines.schema import ClusterConfig, PipelineConfig, PipelineConfigError, load_pipeline_config


def _bare(annotation):
    """The type under Optional and Annotated."""
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _bare(options[0])
    return annotation


def cluster_flags(model: type[BaseModel] = ClusterConfig, path: tuple[str, ...] = ("cluster",)) -> dict[str, tuple]:
    """{flag: (dotted field path, field)} for every leaf field of the cluster section."""
    flags = {}
    for name, field in model.model_fields.items():
        bare = _bare(field.annotation)
        if isinstance(bare, type) and issubclass(bare, BaseModel):
            flags.update(cluster_flags(bare, (*path, name)))
        else:
            flags["--" + "-".join([*path[1:], name]).replace("_", "-")] = (".".join((*path, name)), field)
    return flags


def _value(text: str, field) -> Any:
    bare = _bare(field.annotation)
    if bare is str:
        return text
    value = yaml.safe_load(text)
    if get_origin(bare) is list and isinstance(value, str):
        return [value]  # one name for a list of names
    return value


def _parser() -> argparse.ArgumentParser:
    from pipelines import cluster

    parser = argparse.ArgumentParser(prog="python -m pipelines.cluster", description=cluster.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="print the manifest of one kind as YAML")
    p.add_argument("--config", required=True, help="pipeline definition (YAML)")
    p.add_argument("--kind", required=True, choices=list(cluster.RENDERERS))
    p.add_argument("--model", help="override serve.model (an exported student: s3:// on a cluster)")
    p.add_argument("--storage", help="override resources.storage (s3://bucket/prefix on a cluster)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any field of the definition (value read as YAML); repeatable")
    for flag, (dotted, field) in cluster_flags().items():
        p.add_argument(flag, dest=dotted, default=argparse.SUPPRESS, metavar="VALUE",
                       help=f"{dotted}: {field.description}")
    s = sub.add_parser("stage-cache", help="download the teacher into HF_HOME (what the cache Job runs)")
    s.add_argument("--teacher", required=True, help="teacher.path: a Hugging Face Hub id")
    return parser


def load(args: argparse.Namespace) -> PipelineConfig:
    """The definition with --set, --model, --storage and the cluster flags applied."""
    flag_of = {dotted: (flag, field) for flag, (dotted, field) in cluster_flags().items()}
    given = {flag_of[k][0]: (k, v) for k, v in vars(args).items() if k in flag_of}
    given.update({f"--{k}": (path, v) for k, path in (("model", "serve.model"), ("storage", "resources.storage"))
                  if (v := getattr(args, k))})
    values = {path: _value(v, flag_of[path][1]) if path in flag_of else v for path, v in given.values()}
    return load_pipeline_config(args.config, args.set, values, " ".join(f"{f} {v}" for f, (_, v) in given.items()))


def render_main(args: argparse.Namespace, argv: list[str]) -> int:
    from pipelines import cluster
    from pipelines.cluster import crd, launcher, rayjob
    from pipelines.plan import plan_problems
    from pipelines.yaml_text import to_yaml_documents

    try:
        cfg = load(args)
        planned = cluster.kind_definition(cfg, args.kind)
        problems = plan_problems(planned) + (launcher.problems(planned) if args.kind == "launcher" else [])
        docs = [] if problems else cluster.render(cfg, args.kind)
    except (PipelineConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    if docs and crd.available():
        for doc in (d for d in docs if d.get("apiVersion") == "ray.io/v1"):
            problems += [f"the rendered {doc['kind']} breaks its CRD (cluster/crds): {e}" for e in crd.crd_errors(doc)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    notes = rayjob.notes(cfg) if args.kind == "rayjob" else []
    notes += launcher.notes(planned) if args.kind == "launcher" else []
    if args.kind not in ("rayservice", "cache") and not cfg.resources.storage.startswith("s3://"):
        notes.append(f"resources.storage {cfg.resources.storage!r} is local to each pod or node; a multi-node run "
                     "needs shared storage: pass --storage s3://bucket/prefix")
    if planned.cluster.gpu.memory is None and args.kind not in ("launcher", "cache", "cronjob", "raycronjob"):
        from pipelines.gpu_memory import stage_needs

        if needs := stage_needs(planned):
            worst = max(needs, key=lambda n: n.gb)
            notes.append(f"cluster.gpu.memory is not set: GPU memory not checked ({worst.stage} needs ≈ "
                         f"{worst.gb:.0f} GB per GPU)")
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    print(f"# generated by: python -m pipelines.cluster {' '.join(argv)}")
    print("".join(f"# note: {line}\n" for line in notes), end="")
    sys.stdout.write(to_yaml_documents(docs))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "stage-cache":
        from pipelines.cluster.cache import stage

        print(f"staged {args.teacher} at {stage(args.teacher)}")
        return 0
    return render_main(args, argv)
