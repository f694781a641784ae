"""The Ray cluster launcher file for AWS (`ray up`), with the same node shapes as the KubeRay
groups. A GPU node declares all of its instance type's GPUs and holds as many workers or actors
as fit in them; the default type is the smallest known one whose GPUs hold the definition's
estimated need (pipelines/gpu_memory.py). The dashboard listens on the head's loopback only
(reach it with `ray dashboard`, an SSH tunnel); every node runs with token authentication, the
token synced from the launching machine's ~/.ray/auth_token.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.cluster.pods import GCS_PORT, resource_name
from pipelines.cluster.shapes import memory_bytes, pipeline_groups, pipeline_units, pod_problems
from pipelines.ray_runtime import JOB_ENV_VARS
from pipelines.schema import PipelineConfig


@dataclass(frozen=True)
class Instance:
    gpus: int
    gpu_gb: float  # memory of one GPU
    vcpus: int
    memory_gib: int


# EC2 GPU instance types (AWS's published specifications); others are used as given, unchecked
AWS_GPU_INSTANCES = {
    **{f"g5.{size}": Instance(1, 24, cpus, cpus * 4) for size, cpus in
       (("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16), ("8xlarge", 32), ("16xlarge", 64))},
    "g5.12xlarge": Instance(4, 24, 48, 192), "g5.24xlarge": Instance(4, 24, 96, 384),
    "g5.48xlarge": Instance(8, 24, 192, 768),
    **{f"g6e.{size}": Instance(1, 48, cpus, cpus * 8) for size, cpus in
       (("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16), ("8xlarge", 32), ("16xlarge", 64))},
    "g6e.12xlarge": Instance(4, 48, 48, 384), "g6e.24xlarge": Instance(4, 48, 96, 768),
    "g6e.48xlarge": Instance(8, 48, 192, 1536),
    "p4d.24xlarge": Instance(8, 40, 96, 1152), "p4de.24xlarge": Instance(8, 80, 96, 1152),
    "p5.48xlarge": Instance(8, 80, 192, 2048), "p5e.48xlarge": Instance(8, 141, 192, 2048),
    "p5en.48xlarge": Instance(8, 141, 192, 2048),
}


def _fit_problems(cfg: PipelineConfig, name: str, inst: Instance) -> list[str]:
    """Why the GPU nodes of type `name` cannot hold the definition's GPU units ([] when they can)."""
    source = f"cluster.launcher.gpu_instance_type {name}"
    out = pod_problems(cfg, inst.gpus, source)
    gpu = next((g for g in pipeline_groups(cfg, inst.gpus) if g.gpus), None)
    if gpu is None or out:
        return out
    if gpu.cpus > inst.vcpus:
        out.append(f"{source}: a node holds {inst.vcpus} vCPUs, and the workers or actors on its {inst.gpus} GPU(s) "
                   f"reserve {gpu.cpus} CPUs")
    if memory_bytes(gpu.memory) > inst.memory_gib * 2**30:
        out.append(f"{source}: a node has {inst.memory_gib} GiB of memory, "
                   f"and its workers or actors need {gpu.memory}")
    from pipelines.gpu_memory import memory_problems

    return out + memory_problems(cfg, int(inst.gpu_gb * 1e9), f"{source} ({inst.gpu_gb:g} GB GPUs)")


def gpu_instance(cfg: PipelineConfig) -> tuple[str, Instance | None]:
    """The GPU workers' instance type: the definition's, else the smallest known one that fits."""
    given = cfg.cluster.launcher.gpu_instance_type
    if given:
        return given, AWS_GPU_INSTANCES.get(given)
    by_size = sorted(AWS_GPU_INSTANCES.items(), key=lambda kv: (kv[1].gpus, kv[1].gpu_gb, kv[1].vcpus))
    named = cfg.cluster.gpu.memory  # GPUs at least this large, where the definition names them
    for name, inst in by_size:
        if named and inst.gpu_gb * 1e9 < memory_bytes(named):
            continue
        if not _fit_problems(cfg, name, inst):
            return name, inst
    raise ValueError("cluster.launcher.gpu_instance_type: no known GPU instance type holds this definition's GPU "
                     "stages (python pipelines/distill.py --config ... --dry-run shows their estimates); name one")


def problems(cfg: PipelineConfig) -> list[str]:
    if not any(u.gpus for u in pipeline_units(cfg)):
        return []
    name, inst = gpu_instance(cfg)
    return _fit_problems(cfg, name, inst) if inst else []


def notes(cfg: PipelineConfig) -> list[str]:
    if not any(u.gpus for u in pipeline_units(cfg)):
        return []
    name, inst = gpu_instance(cfg)
    if inst is None:
        return [f"cluster.launcher.gpu_instance_type {name} is not in the known types: its GPUs, vCPUs and memory "
                "are not checked, and each node declares the GPUs one pod shape asks for"]
    return [f"GPU workers: {name} ({inst.gpus} × {inst.gpu_gb:g} GB GPUs, {inst.vcpus} vCPUs, {inst.memory_gib} GiB)"]


def render_launcher(cfg: PipelineConfig) -> list[dict]:
    c = cfg.cluster.launcher
    has_gpus = any(u.gpus for u in pipeline_units(cfg))
    gpu_type, inst = gpu_instance(cfg) if has_gpus else (None, None)
    groups = [g for g in pipeline_groups(cfg, inst.gpus if inst else None) if g.max > 0]
    profile = {"IamInstanceProfile": {"Arn": c.instance_profile}} if c.instance_profile else {}
    node_types = {"head": {"node_config": {"InstanceType": c.head_instance_type, **profile}, "resources": {"CPU": 0}}}
    for g in groups:
        node_types[f"{g.name}_worker"] = {
            "node_config": {"InstanceType": gpu_type if g.gpus else c.cpu_instance_type, **profile},
            "resources": {"CPU": g.cpus, **({"GPU": g.gpus} if g.gpus else {})},
            "min_workers": g.min_replicas, "max_workers": g.max,
        }
    env = " ".join(f"{k}={v}" for k, v in {**JOB_ENV_VARS, "RAY_AUTH_MODE": "token"}.items())
    return [{
        "cluster_name": resource_name(cfg),
        "max_workers": sum(g.max for g in groups),
        "idle_timeout_minutes": max(1, cfg.cluster.idle_timeout_seconds // 60),
        "provider": {"type": "aws", "region": c.region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {"image": cfg.cluster.image, "container_name": "ray_container", "pull_before_run": True},
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
        "head_node_type": "head",
        "available_node_types": node_types,
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {env} ray start --head --port={GCS_PORT} --num-cpus=0 --dashboard-host=127.0.0.1 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": [
            "ray stop", f"ulimit -n 65536; {env} ray start --address=$RAY_HEAD_IP:{GCS_PORT}"],
    }]
