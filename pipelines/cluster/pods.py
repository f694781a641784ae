"""What every rendered KubeRay cluster shares: names, pod templates and the RayClusterSpec.

Every Ray container gets the image and its pull secrets, the Secrets by reference (storage
credentials, the Hugging Face token, the Serve API key), the model cache at HF_HOME and a
memory-backed /dev/shm (Ray's object store and NCCL use it; a container's default is 64 MB).
GPU pods also get the pool's node selector, tolerations, affinity and extra resources.
"""

from __future__ import annotations

import re

import yaml

from pipelines.cluster.shapes import WorkerGroup
from pipelines.schema import PipelineConfig

# KubeRay's `rayVersion`: the Ray of the image cluster/Dockerfile builds, pinned in
# cluster/constraints.txt (tests/test_cluster_image.py checks the three agree). Token
# authentication needs Ray >= 2.52.
RAY_VERSION = "2.60.0"
HEAD_CPUS = 2
DEFINITION_DIR = "/etc/swd"  # where the head mounts the definition
GCS_PORT, DASHBOARD_PORT = 6379, 8265
HF_TOKEN_KEY = "HF_TOKEN"  # the key of cluster.hf_token_secret
CACHE_VOLUME, SHM_VOLUME = "hf-cache", "dshm"


def resource_name(cfg: PipelineConfig) -> str:
    """`swd-<name>` as a Kubernetes name: lower case, dashes, short enough for KubeRay's suffixes."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"swd-{cfg.name}".lower()).strip("-")
    return name[:40].rstrip("-")


def auth_secret(cfg: PipelineConfig) -> str:
    return cfg.cluster.auth_secret or f"{resource_name(cfg)}-ray-token"


def storage_secret(cfg: PipelineConfig) -> str | None:
    c = cfg.cluster
    if c.storage_secret:
        return c.storage_secret
    return f"{resource_name(cfg)}-storage" if uses_s3(cfg) and not c.service_account else None


def uses_s3(cfg: PipelineConfig) -> bool:
    paths = [cfg.resources.storage, cfg.data.prompts, cfg.data.eval_prompts, cfg.serve.model, cfg.evaluate.student,
             cfg.synthesize.output, cfg.precompute.output, *(s.path for s in cfg.data.sources)]
    return any(p and p.startswith("s3://") for p in paths)


def metadata(cfg: PipelineConfig, name: str) -> dict:
    meta = {"name": name,
            "labels": {"app.kubernetes.io/name": "swd", "app.kubernetes.io/instance": resource_name(cfg)}}
    if cfg.cluster.namespace:
        meta["namespace"] = cfg.cluster.namespace
    return meta


def env(cfg: PipelineConfig) -> list[dict]:
    """Secrets by reference only; the job's variables travel in its runtime env."""
    c, out = cfg.cluster, []
    if c.hf_token_secret:
        out.append({"name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": c.hf_token_secret, "key": HF_TOKEN_KEY}}})
    if c.model_cache:
        out.append({"name": "HF_HOME", "value": c.model_cache.path})
        if c.model_cache.read_only:
            out.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if cfg.serve.api_key_env:
        out.append({"name": cfg.serve.api_key_env,
                    "valueFrom": {"secretKeyRef": {"name": f"{resource_name(cfg)}-api-key", "key": "key"}}})
    return out


def cache_volume(cfg: PipelineConfig, read_only: bool) -> tuple[dict, dict]:
    """The model cache as (volume, mount)."""
    m = cfg.cluster.model_cache
    source = ({"persistentVolumeClaim": {"claimName": m.claim, "readOnly": read_only}} if m.claim
              else dict(m.volume))
    return {"name": CACHE_VOLUME, **source}, {"name": CACHE_VOLUME, "mountPath": m.path, "readOnly": read_only}


def pod_spec(cfg: PipelineConfig, containers: list[dict], volumes: list[dict] = ()) -> dict:
    """A pod spec with the definition's service account and pull secrets."""
    c = cfg.cluster
    spec = {"containers": containers}
    if c.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in c.image_pull_secrets]
    if c.service_account:
        spec["serviceAccountName"] = c.service_account
    if volumes:
        spec["volumes"] = list(volumes)
    return spec


def pod_template(cfg: PipelineConfig, container: str, cpus: int, gpus: int, memory: str, ports: list[dict] = (),
                 mounts: list[dict] = (), volumes: list[dict] = ()) -> dict:
    c = cfg.cluster
    amounts = {"cpu": str(cpus), "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
        amounts.update({k: str(v) for k, v in c.gpu.extra_resources.items()})
    mounts, volumes = list(mounts), list(volumes)
    mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
    if c.model_cache:
        volume, mount = cache_volume(cfg, c.model_cache.read_only)
        volumes.append(volume)
        mounts.append(mount)
    box = {"name": container, "image": c.image, "resources": {"limits": dict(amounts), "requests": dict(amounts)}}
    if variables := env(cfg):
        box["env"] = variables
    if secret := storage_secret(cfg):
        box["envFrom"] = [{"secretRef": {"name": secret}}]
    if ports:
        box["ports"] = list(ports)
    box["volumeMounts"] = mounts
    spec = pod_spec(cfg, [box], volumes)
    if gpus:
        if c.gpu.node_selector:
            spec["nodeSelector"] = dict(c.gpu.node_selector)
        if c.gpu.tolerations:
            spec["tolerations"] = [t.model_dump(exclude_none=True) for t in c.gpu.tolerations]
        if c.gpu.affinity:
            spec["affinity"] = dict(c.gpu.affinity)
    return {"spec": spec}


def worker_group_spec(cfg: PipelineConfig, g: WorkerGroup) -> dict:
    return {"groupName": g.name, "replicas": g.replicas, "minReplicas": g.min_replicas, "maxReplicas": g.max,
            "rayStartParams": {}, "template": pod_template(cfg, "ray-worker", g.cpus, g.gpus, g.memory)}


def ray_cluster_spec(cfg: PipelineConfig, groups: list[WorkerGroup], autoscale: bool, head_ports: list[dict] = (),
                     head_mounts: list[dict] = (), head_volumes: list[dict] = ()) -> dict:
    """A RayClusterSpec: token authentication, a ClusterIP head without GPUs that runs no tasks."""
    ports = [{"containerPort": GCS_PORT, "name": "gcs-server"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
             *head_ports]
    spec = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": auth_secret(cfg)},
        "enableInTreeAutoscaling": autoscale,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # the dashboard listens on the pod's address so `kubectl port-forward` and the
            # in-cluster job submitter reach it; the ClusterIP Service keeps it inside the cluster
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": pod_template(cfg, "ray-head", HEAD_CPUS, 0, cfg.cluster.head_memory, ports, head_mounts,
                                     head_volumes),
        },
        "workerGroupSpecs": [worker_group_spec(cfg, g) for g in groups if g.max > 0],
    }
    if autoscale:
        spec["autoscalerOptions"] = {"idleTimeoutSeconds": cfg.cluster.idle_timeout_seconds}
    return spec


def definition_configmap(cfg: PipelineConfig) -> dict:
    """The resolved definition a job runs, mounted on the head at DEFINITION_DIR."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(cfg, f"{resource_name(cfg)}-definition"),
            "data": {"definition.yaml": text}}


def definition_mount(cfg: PipelineConfig) -> tuple[list[dict], list[dict]]:
    volume = {"name": "definition", "configMap": {"name": f"{resource_name(cfg)}-definition"}}
    return [{"name": "definition", "mountPath": DEFINITION_DIR, "readOnly": True}], [volume]
