"""Pod shapes from the definition: what each stage reserves through Ray (`Unit`), and the worker
groups whose pods hold it (`WorkerGroup`).

Stages run one after another, so each group is as large as the largest stage needs. GPU pods
hold `cluster.gpu.per_pod` GPUs (default: the most any unit asks for) and as many units as fit
in them; CPU-only units get their own group, so they never hold a GPU pod. Memory per pod is
the units' `memory_per_*` times the units a pod holds, else DEFAULT_MEMORY.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipelines.schema import PipelineConfig

DEFAULT_MEMORY = "8Gi"  # per pod, where the definition gives no `memory_per_*`

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def memory_bytes(quantity: str) -> int:
    """A memory quantity as the schema accepts it (pipelines.schema.MEMORY_PATTERN), in bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return math.ceil(float(number) * _UNITS[unit])


def memory_quantity(n_bytes: int) -> str:
    return f"{n_bytes // 2**30}Gi" if n_bytes % 2**30 == 0 else f"{math.ceil(n_bytes / 2**20)}Mi"


@dataclass(frozen=True)
class Unit:
    """Some number of identical Ray actors or workers that one stage runs at once."""

    stage: str
    count: int
    cpus: float
    gpus: float
    memory: str | None = None
    setting: str = ""  # the field that gives the unit its GPUs, for messages


@dataclass
class WorkerGroup:
    """One KubeRay worker group / launcher node type: `replicas` pods of one shape."""

    name: str
    replicas: int
    cpus: int
    gpus: int
    memory: str
    min_replicas: int = 0
    max_replicas: int | None = None  # default: replicas

    @property
    def max(self) -> int:
        return max(self.replicas, self.max_replicas or 0)


def pipeline_units(cfg: PipelineConfig) -> list[Unit]:
    """What each stage of the definition reserves through Ray (preview runs with evaluate's)."""
    units = []
    if "synthesize" in cfg.stages and cfg.synthesize.enabled:
        s = cfg.synthesize
        units.append(Unit("synthesize", s.actors, s.cpus_per_actor, s.gpus_per_actor, s.memory_per_actor,
                          "synthesize.gpus_per_actor"))
    if "precompute" in cfg.stages:
        p = cfg.precompute
        units.append(Unit("precompute", p.actors, p.cpus_per_actor, p.gpus_per_actor, p.memory_per_actor,
                          "precompute.gpus_per_actor"))
    if "distill" in cfg.stages:
        r = cfg.resources
        units.append(Unit("distill", r.num_workers, r.cpus_per_worker, r.gpus_per_worker, r.memory_per_worker,
                          "resources.gpus_per_worker"))
    if "evaluate" in cfg.stages or "preview" in cfg.stages:
        e = cfg.evaluate
        units.append(Unit("evaluate", 1, e.cpus, e.gpus, e.memory, "evaluate.gpus"))
    if "deploy" in cfg.stages:
        units.append(serve_unit(cfg))
    return units


def serve_unit(cfg: PipelineConfig) -> Unit:
    s = cfg.serve
    return Unit("deploy", s.max_replicas or s.replicas, s.cpus_per_replica, s.gpus_per_replica, s.memory_per_replica,
                "serve.gpus_per_replica")


def pod_gpus(units: list[Unit], per_pod: int | None = None) -> int:
    """GPUs of one GPU pod: `per_pod` when the definition gives it, else the largest whole number
    any unit asks for."""
    return per_pod or max([math.ceil(u.gpus) for u in units if u.gpus > 0] + [0])


def per_pod(unit: Unit, gpus: int) -> int:
    """Units of one kind a pod of `gpus` GPUs holds; fractional units share a GPU."""
    return max(1, math.floor(gpus / unit.gpus + 1e-9))


def _pod_memory(units: list[tuple[Unit, int]]) -> str:
    """The most any stage puts on one pod: per-unit memory times the units per pod."""
    sized = [memory_bytes(u.memory) * n for u, n in units if u.memory]
    return memory_quantity(max(sized)) if sized else DEFAULT_MEMORY


def size_groups(units: list[Unit], gpus_per_pod: int | None = None, cpu_max_replicas: int = 1,
                gpu_name: str = "gpu", cpu_name: str = "cpu") -> list[WorkerGroup]:
    """The GPU group (when a unit asks for GPUs) and the CPU group, each as large as the largest
    stage needs. Ray Data's read and map tasks need CPUs that the actors and training workers do
    not reserve (the head runs none), so the autoscaler may add up to `cpu_max_replicas` CPU pods."""
    groups = []
    gpu_units = [u for u in units if u.gpus > 0]
    if gpu_units:
        gpus = pod_gpus(gpu_units, gpus_per_pod)
        placed = [(u, per_pod(u, gpus)) for u in gpu_units]
        groups.append(WorkerGroup(
            gpu_name, replicas=max(math.ceil(u.count / n) for u, n in placed),
            cpus=max(1, max(math.ceil(u.cpus * n) for u, n in placed)), gpus=gpus, memory=_pod_memory(placed)))
    cpu_units = [u for u in units if u.gpus == 0]
    pod_cpus = max([math.ceil(u.cpus) for u in cpu_units] + [1])
    placed = [(u, math.floor(pod_cpus / u.cpus + 1e-9) if u.cpus else u.count) for u in cpu_units]
    replicas = max([math.ceil(u.count / n) for u, n in placed] + [0])
    groups.append(WorkerGroup(cpu_name, replicas=replicas, cpus=pod_cpus, gpus=0, memory=_pod_memory(placed),
                              max_replicas=max(replicas, cpu_max_replicas)))
    return groups


def pipeline_groups(cfg: PipelineConfig, gpus_per_pod: int | None = None) -> list[WorkerGroup]:
    """The worker groups of the stages the definition runs."""
    c = cfg.cluster
    return size_groups(pipeline_units(cfg), gpus_per_pod or c.gpu.per_pod, c.cpu_max_replicas)


def serve_groups(cfg: PipelineConfig) -> list[WorkerGroup]:
    """One pod per generator replica, from min_replicas to max_replicas when autoscaling."""
    s, unit = cfg.serve, serve_unit(cfg)
    fixed = s.min_replicas if s.min_replicas is not None else s.replicas
    return [WorkerGroup("generator", replicas=fixed, min_replicas=fixed, max_replicas=s.max_replicas or s.replicas,
                        cpus=max(1, math.ceil(unit.cpus)), gpus=math.ceil(unit.gpus),
                        memory=unit.memory or DEFAULT_MEMORY)]


def pod_problems(cfg: PipelineConfig, gpus_per_pod: int | None = None,
                 source: str = "cluster.gpu.per_pod") -> list[str]:
    """Shapes no cluster can run, one line each: a unit with more GPUs than a pod holds, or a
    placement strategy the GPU pods cannot satisfy (Ray would wait for it forever)."""
    units = [u for u in pipeline_units(cfg) if u.gpus > 0]
    if not units:
        return []
    given = gpus_per_pod or cfg.cluster.gpu.per_pod
    gpus = pod_gpus(units, given)
    out = [f"{source} {gpus}: {u.setting} {u.gpus:g} asks for more GPUs than one pod holds; a worker, actor or "
           f"replica never spans pods" for u in units if u.gpus > gpus]
    r = cfg.resources
    if "distill" in cfg.stages and r.gpus_per_worker > 0 and not out:
        n, fit = r.num_workers, per_pod(next(u for u in units if u.stage == "distill"), gpus)
        if r.placement_strategy == "STRICT_PACK" and n > fit:
            out.append(f"resources.placement_strategy STRICT_PACK puts all {n} Ray Train workers on one node, and a "
                       f"GPU pod holds {fit} ({source} {gpus}): use PACK, which fills each pod's GPUs first")
        if r.placement_strategy == "STRICT_SPREAD" and fit > 1:
            out.append(f"resources.placement_strategy STRICT_SPREAD puts each Ray Train worker on its own node, and "
                       f"{source} {gpus} packs {fit} into a pod: use PACK, which keeps a pod's workers together")
    return out
