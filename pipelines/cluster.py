"""Cluster manifests rendered from the pipeline definition: KubeRay objects and a Ray cluster launcher file.

    python -m pipelines.cluster render --config pipelines/configs/sd35_medium_4step.yaml --kind rayjob \\
        --image REGISTRY/swd-ray:TAG > rayjob.yaml
    kubectl apply -f rayjob.yaml

Kinds (docs/cluster.md says how to run each):
  rayjob       a KubeRay RayJob: a Ray cluster made for the whole pipeline, the job, then teardown;
               followed by the ConfigMap holding the definition the job runs
  raycluster   a standing KubeRay RayCluster sized for the pipeline, for `ray job submit`
  rayservice   a KubeRay RayService serving the distilled student (the Serve config of
               `python -m pipelines.serve.config` inside)
  launcher     a Ray cluster launcher file for AWS (`ray up`)
  raycronjob   scheduled retraining (a `retrain` section): a KubeRay RayCronJob (KubeRay >= 1.6,
               alpha, feature gate `RayCronJob`) whose RayJobs run `pipelines.retrain --once` on
               the standing RayCluster of `--kind raycluster`, where the Serve app follows the champion
  cronjob      the same for older operators: a Kubernetes CronJob whose pod runs `ray job submit`
               of one cycle against that RayCluster (concurrencyPolicy Forbid)

Pods are sized from the definition: a head without GPUs that runs no tasks (`num-cpus: 0`: the
driver, Serve's controller and proxy, the autoscaler), a GPU worker group shaped like the largest
GPU actor or worker of the stages the definition runs (precompute and synthesize actors, Ray
Train workers, Serve replicas), and a CPU group for CPU-only actors and Ray Data's tasks. Memory
per pod comes from the definition's `memory_per_*` settings, else DEFAULT_MEMORY.

Every KubeRay cluster turns on Ray token authentication from a Kubernetes Secret (key
`auth_token`); the head's Service stays ClusterIP, so the dashboard and job API (8265) and the
client port (10001) are reachable only inside the cluster or through `kubectl port-forward`.
Only Serve's port can be exposed beyond the cluster, and only when the definition sets an API key.
Storage credentials come from a Secret (as environment variables) or a service account, by name.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Callable

import yaml

from pipelines.schema import PipelineConfig, PipelineConfigError, load_pipeline_config

RAY_VERSION = version("ray")  # KubeRay's `rayVersion`: token authentication needs Ray >= 2.52
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"  # must have this project installed (docs/cluster.md)
DEFAULT_MEMORY = "8Gi"  # per pod, where the definition gives no `memory_per_*`
HEAD_CPUS = 2
# What cluster/runtime_env.yaml sets for `ray job submit`; the image holds the code.
# no download or "Loading weights" bars: a job log is not a terminal (pipelines/ray_runtime.py)
ENV_VARS = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}
DEFINITION_DIR = "/etc/swd"  # where the RayJob's head mounts the definition
GCS_PORT, DASHBOARD_PORT = 6379, 8265
SERVICE_TYPES = ("ClusterIP", "LoadBalancer", "NodePort")


@dataclass
class Options:
    """What the definition does not say: where the cluster runs and how it reaches its secrets.

    image: container image with this project installed (every pod).
    namespace: Kubernetes namespace of every object; None: kubectl's current one.
    auth_secret: Secret with key `auth_token`, Ray's cluster token; default `<name>-ray-token`.
    storage_secret: Secret whose keys become environment variables on every Ray container (e.g.
        AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); default `<name>-storage` when the definition
        reads or writes `s3://` and no service account is given.
    service_account: service account of every pod (e.g. one bound to an IAM role); None: the default.
    serve_service_type: type of the RayService's Serve Service; anything but ClusterIP needs an API key.
    head_memory: the head pod's memory (the driver runs there).
    aws_region, head/cpu/gpu_instance_type, instance_profile: the launcher's AWS settings.
    """

    image: str = DEFAULT_IMAGE
    namespace: str | None = None
    auth_secret: str | None = None
    storage_secret: str | None = None
    service_account: str | None = None
    serve_service_type: str = "ClusterIP"
    head_memory: str = DEFAULT_MEMORY
    aws_region: str = "us-west-2"
    head_instance_type: str = "m6i.2xlarge"
    cpu_instance_type: str = "m6i.2xlarge"
    gpu_instance_type: str = "g6e.2xlarge"
    instance_profile: str | None = None

    def __post_init__(self):
        if self.serve_service_type not in SERVICE_TYPES:
            raise ValueError(f"serve service type {self.serve_service_type!r}: allowed {', '.join(SERVICE_TYPES)}")


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the RayService's embedded Serve config), no anchors."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def to_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def to_yaml_documents(docs: list[dict]) -> str:
    return "---\n".join(to_yaml(d) for d in docs)


# --- names and quantities ----------------------------------------------------------------------


def resource_name(cfg: PipelineConfig) -> str:
    """`swd-<name>` as a Kubernetes name: lower case, dashes, short enough for KubeRay's suffixes."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"swd-{cfg.name}".lower()).strip("-")
    return name[:40].rstrip("-")


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return math.ceil(float(number) * _UNITS[unit])


def memory_quantity(n_bytes: int) -> str:
    return f"{n_bytes // 2**30}Gi" if n_bytes % 2**30 == 0 else f"{math.ceil(n_bytes / 2**20)}Mi"


def _uses_s3(cfg: PipelineConfig) -> bool:
    paths = [cfg.resources.storage, cfg.data.prompts, cfg.data.eval_prompts, cfg.serve.model, cfg.evaluate.student,
             cfg.synthesize.output, cfg.precompute.output, *(s.path for s in cfg.data.sources)]
    return any(p and p.startswith("s3://") for p in paths)


# --- sizing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """Some number of identical Ray actors or workers that one stage runs at once."""

    stage: str
    count: int
    cpus: float
    gpus: float
    memory: str | None = None


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
        units.append(Unit("synthesize", s.actors, s.cpus_per_actor, s.gpus_per_actor, s.memory_per_actor))
    if "precompute" in cfg.stages:
        p = cfg.precompute
        units.append(Unit("precompute", p.actors, p.cpus_per_actor, p.gpus_per_actor, p.memory_per_actor))
    if "distill" in cfg.stages:
        r = cfg.resources
        units.append(Unit("distill", r.num_workers, r.cpus_per_worker, r.gpus_per_worker, r.memory_per_worker))
    if "evaluate" in cfg.stages or "preview" in cfg.stages:
        e = cfg.evaluate
        units.append(Unit("evaluate", 1, e.cpus, e.gpus, e.memory))
    if "deploy" in cfg.stages:
        units.append(serve_unit(cfg))
    return units


def serve_unit(cfg: PipelineConfig) -> Unit:
    s = cfg.serve
    return Unit("deploy", s.max_replicas or s.replicas, s.cpus_per_replica, s.gpus_per_replica, s.memory_per_replica)


def _pod_memory(units: list[tuple[Unit, int]]) -> str:
    """The most any stage puts on one pod: per-unit memory times the units per pod."""
    sized = [memory_bytes(u.memory) * per_pod for u, per_pod in units if u.memory]
    return memory_quantity(max(sized)) if sized else DEFAULT_MEMORY


def size_groups(units: list[Unit], gpu_name: str = "gpu", cpu_name: str = "cpu") -> list[WorkerGroup]:
    """Stages run one after another, so each group is as large as the largest stage's need.

    GPU pods get the largest whole number of GPUs any unit asks for; units with fractional GPUs
    share a pod's GPUs. CPU-only units get their own group, so they never hold a GPU pod.
    """
    groups = []
    gpu_units = [u for u in units if u.gpus > 0]
    if gpu_units:
        pod_gpus = max(math.ceil(u.gpus) for u in gpu_units)
        placed = [(u, max(1, math.floor(pod_gpus / u.gpus + 1e-9))) for u in gpu_units]
        groups.append(WorkerGroup(
            gpu_name, replicas=max(math.ceil(u.count / per_pod) for u, per_pod in placed),
            cpus=max(1, max(math.ceil(u.cpus * per_pod) for u, per_pod in placed)), gpus=pod_gpus,
            memory=_pod_memory(placed)))
    cpu_units = [u for u in units if u.gpus == 0]
    pod_cpus = max([math.ceil(u.cpus) for u in cpu_units] + [1])
    placed = [(u, math.floor(pod_cpus / u.cpus + 1e-9) if u.cpus else u.count) for u in cpu_units]
    replicas = max([math.ceil(u.count / per_pod) for u, per_pod in placed] + [0])
    # Ray Data's read and map tasks need CPUs that the actors and training workers do not
    # reserve (the head runs none), so the autoscaler may always add at least one CPU pod.
    groups.append(WorkerGroup(cpu_name, replicas=replicas, cpus=pod_cpus, gpus=0, memory=_pod_memory(placed),
                              max_replicas=max(replicas, 1)))
    return groups


def serve_groups(cfg: PipelineConfig) -> list[WorkerGroup]:
    """One pod per generator replica, from min_replicas to max_replicas when autoscaling."""
    s, unit = cfg.serve, serve_unit(cfg)
    fixed = s.min_replicas if s.min_replicas is not None else s.replicas
    return [WorkerGroup("generator", replicas=fixed, min_replicas=fixed, max_replicas=s.max_replicas or s.replicas,
                        cpus=max(1, math.ceil(unit.cpus)), gpus=math.ceil(unit.gpus), memory=unit.memory or DEFAULT_MEMORY)]


# --- KubeRay -----------------------------------------------------------------------------------


def _metadata(cfg: PipelineConfig, opts: Options, name: str) -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/name": "swd", "app.kubernetes.io/instance": resource_name(cfg)}}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _env(cfg: PipelineConfig) -> list[dict]:
    """Secrets by reference only; ENV_VARS travel in the job's or the Serve app's runtime env."""
    env = []
    if cfg.serve.api_key_env:
        env.append({"name": cfg.serve.api_key_env,
                    "valueFrom": {"secretKeyRef": {"name": f"{resource_name(cfg)}-api-key", "key": "key"}}})
    return env


def _storage_secret(cfg: PipelineConfig, opts: Options) -> str | None:
    if opts.storage_secret:
        return opts.storage_secret
    return f"{resource_name(cfg)}-storage" if _uses_s3(cfg) and not opts.service_account else None


def _pod_template(cfg: PipelineConfig, opts: Options, container: str, cpus: int, gpus: int, memory: str,
                  ports: list[dict] = (), mounts: list[dict] = (), volumes: list[dict] = ()) -> dict:
    amounts = {"cpu": str(cpus), "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    c = {"name": container, "image": opts.image, "resources": {"limits": dict(amounts), "requests": dict(amounts)}}
    if env := _env(cfg):
        c["env"] = env
    if secret := _storage_secret(cfg, opts):
        c["envFrom"] = [{"secretRef": {"name": secret}}]
    if ports:
        c["ports"] = list(ports)
    if mounts:
        c["volumeMounts"] = list(mounts)
    spec = {"containers": [c]}
    if opts.service_account:
        spec["serviceAccountName"] = opts.service_account
    if volumes:
        spec["volumes"] = list(volumes)
    return {"spec": spec}


def _worker_group_spec(cfg: PipelineConfig, opts: Options, g: WorkerGroup) -> dict:
    return {"groupName": g.name, "replicas": g.replicas, "minReplicas": g.min_replicas, "maxReplicas": g.max,
            "rayStartParams": {},
            "template": _pod_template(cfg, opts, "ray-worker", g.cpus, g.gpus, g.memory)}


def ray_cluster_spec(cfg: PipelineConfig, opts: Options, groups: list[WorkerGroup], autoscale: bool,
                     head_ports: list[dict] = (), head_mounts: list[dict] = (), head_volumes: list[dict] = ()) -> dict:
    """A RayClusterSpec: token authentication, a ClusterIP head without GPUs that runs no tasks."""
    ports = [{"containerPort": GCS_PORT, "name": "gcs-server"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
             *head_ports]
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": opts.auth_secret or f"{resource_name(cfg)}-ray-token"},
        "enableInTreeAutoscaling": autoscale,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            # the dashboard listens on the pod's address so `kubectl port-forward` and the
            # in-cluster job submitter reach it; the ClusterIP Service keeps it inside the cluster
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod_template(cfg, opts, "ray-head", HEAD_CPUS, 0, opts.head_memory, ports, head_mounts,
                                      head_volumes),
        },
        "workerGroupSpecs": [_worker_group_spec(cfg, opts, g) for g in groups if g.max > 0],
    }


def definition_configmap(cfg: PipelineConfig, opts: Options) -> dict:
    """The resolved definition the RayJob runs, mounted on the head at DEFINITION_DIR."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(cfg, opts, f"{resource_name(cfg)}-definition"),
            "data": {"definition.yaml": text}}


def _definition_mount(cfg: PipelineConfig) -> tuple[list[dict], list[dict]]:
    volume = {"name": "definition", "configMap": {"name": f"{resource_name(cfg)}-definition"}}
    return [{"name": "definition", "mountPath": DEFINITION_DIR, "readOnly": True}], [volume]


def rayjob_spec(cfg: PipelineConfig, opts: Options) -> dict:
    """A RayJobSpec for the whole pipeline (also a RayCronJob's `jobTemplate`): KubeRay makes the
    cluster, submits the driver from a submitter pod with the cluster's token, and tears the
    cluster down when the job ends. Reads the definition from `definition_configmap`."""
    mounts, volumes = _definition_mount(cfg)
    return {
        "entrypoint": f"python -m pipelines.distill --config {DEFINITION_DIR}/definition.yaml",
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": dict(ENV_VARS)}, sort_keys=False),
        "shutdownAfterJobFinishes": True,
        # the cluster outlives the job by ten minutes: time to read it in the dashboard
        "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": ray_cluster_spec(cfg, opts, size_groups(pipeline_units(cfg)), autoscale=True,
                                           head_mounts=mounts, head_volumes=volumes),
    }


def render_rayjob(cfg: PipelineConfig, opts: Options) -> list[dict]:
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(cfg, opts, resource_name(cfg)),
           "spec": rayjob_spec(cfg, opts)}
    return [job, definition_configmap(cfg, opts)]


def render_raycluster(cfg: PipelineConfig, opts: Options) -> list[dict]:
    """A standing cluster for the pipeline, with the definition mounted on the head. With a
    `retrain` section it is also where cycles run and the Serve app lives: generator pods
    beside the pipeline's groups, since serving goes on while a cycle trains."""
    groups = size_groups(pipeline_units(cfg))
    if cfg.retrain is not None:
        groups += serve_groups(cfg)
    mounts, volumes = _definition_mount(cfg)
    spec = ray_cluster_spec(cfg, opts, groups, autoscale=True, head_mounts=mounts, head_volumes=volumes,
                            head_ports=[{"containerPort": cfg.serve.port, "name": "serve"}] if cfg.retrain else ())
    return [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(cfg, opts, resource_name(cfg)),
             "spec": spec}, definition_configmap(cfg, opts)]


RETRAIN_ENTRYPOINT = "python -m pipelines.retrain --once --config {}/definition.yaml"


def _needs_retrain(cfg: PipelineConfig, kind: str) -> None:
    if cfg.retrain is None:
        raise ValueError(f"--kind {kind}: the definition has no `retrain` section (docs/retrain.md)")


def render_raycronjob(cfg: PipelineConfig, opts: Options) -> list[dict]:
    """Each tick, KubeRay creates a RayJob that submits one cycle to the standing RayCluster
    (`clusterSelector`; render it with --kind raycluster). The operator does not prevent
    overlapping runs; the cycle's lock does (a second exits and changes nothing)."""
    _needs_retrain(cfg, "raycronjob")
    r = cfg.retrain
    job = {
        "entrypoint": RETRAIN_ENTRYPOINT.format(DEFINITION_DIR),
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": dict(ENV_VARS)}, sort_keys=False),
        "clusterSelector": {"ray.io/cluster": resource_name(cfg)},
        # a cycle that fails is resumed by the next tick, not retried at once
        "backoffLimit": 0,
    }
    spec = {"schedule": r.schedule, "timeZone": r.timezone, "jobTemplate": job}
    return [{"apiVersion": "ray.io/v1", "kind": "RayCronJob",
             "metadata": _metadata(cfg, opts, f"{resource_name(cfg)}-retrain"), "spec": spec}]


def render_cronjob(cfg: PipelineConfig, opts: Options) -> list[dict]:
    """A Kubernetes CronJob (any KubeRay version): its pod submits one cycle to the standing
    RayCluster's job API with the cluster's token; `concurrencyPolicy: Forbid` skips a tick while
    the previous cycle's submitter still runs (and the cycle's lock guards the rest)."""
    _needs_retrain(cfg, "cronjob")
    r, name = cfg.retrain, resource_name(cfg)
    secret = opts.auth_secret or f"{name}-ray-token"
    submit = ["ray", "job", "submit", "--address", f"http://{name}-head-svc:{DASHBOARD_PORT}",
              "--runtime-env-json", json.dumps({"env_vars": dict(ENV_VARS)}), "--",
              *RETRAIN_ENTRYPOINT.format(DEFINITION_DIR).split()]
    container = {"name": "submit-cycle", "image": opts.image, "command": submit,
                 "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                         {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}}],
                 "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}}
    pod = {"restartPolicy": "Never", "containers": [container]}
    if opts.service_account:
        pod["serviceAccountName"] = opts.service_account
    spec = {"schedule": r.schedule, "timeZone": r.timezone, "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 0, "template": {"spec": pod}}}}
    return [{"apiVersion": "batch/v1", "kind": "CronJob", "metadata": _metadata(cfg, opts, f"{name}-retrain"),
             "spec": spec}]


def render_rayservice(cfg: PipelineConfig, opts: Options) -> list[dict]:
    """The Serve config of `pipelines.serve.config` in a RayService. The head runs Serve's
    controller and a proxy; generator replicas run on the worker group. The Serve Service carries
    only Serve's port; it leaves the cluster (a LoadBalancer or NodePort) only behind an API key."""
    from pipelines.serve.config import serve_config  # imports Ray Serve: only here

    s = cfg.serve
    if opts.serve_service_type != "ClusterIP" and not (s.api_key_env or s.api_key_file):
        raise ValueError(f"a {opts.serve_service_type} Serve Service would expose the model without a key: "
                         "set serve.api_key_env (or serve.api_key_file) in the definition, or keep ClusterIP")
    serve_port = {"containerPort": s.port, "name": "serve"}
    spec = {
        "serveConfigV2": to_yaml(serve_config(cfg)),
        "rayClusterConfig": ray_cluster_spec(cfg, opts, serve_groups(cfg), autoscale=s.min_replicas is not None,
                                             head_ports=[serve_port]),
        "serveService": {"spec": {"type": opts.serve_service_type,
                                  "ports": [{"name": "serve", "port": s.port, "targetPort": s.port}]}},
    }
    return [{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _metadata(cfg, opts, resource_name(cfg)),
             "spec": spec}]


# --- Ray cluster launcher (AWS) ----------------------------------------------------------------


def render_launcher(cfg: PipelineConfig, opts: Options) -> list[dict]:
    """A `ray up` file with the same node shapes as the KubeRay groups. The dashboard listens on
    the head's loopback only (reach it with `ray dashboard`, an SSH tunnel); every node runs with
    token authentication, the token synced from the launching machine's ~/.ray/auth_token."""
    groups = [g for g in size_groups(pipeline_units(cfg)) if g.max > 0]
    profile = {"IamInstanceProfile": {"Arn": opts.instance_profile}} if opts.instance_profile else {}
    node_types = {"head": {"node_config": {"InstanceType": opts.head_instance_type, **profile},
                           "resources": {"CPU": 0}}}
    for g in groups:
        instance = opts.gpu_instance_type if g.gpus else opts.cpu_instance_type
        node_types[f"{g.name}_worker"] = {
            "node_config": {"InstanceType": instance, **profile},
            "resources": {"CPU": g.cpus, **({"GPU": g.gpus} if g.gpus else {})},
            "min_workers": g.min_replicas, "max_workers": g.max,
        }
    env = " ".join(f"{k}={v}" for k, v in {**ENV_VARS, "RAY_AUTH_MODE": "token"}.items())
    return [{
        "cluster_name": resource_name(cfg),
        "max_workers": sum(g.max for g in groups),
        "idle_timeout_minutes": 10,
        "provider": {"type": "aws", "region": opts.aws_region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {"image": opts.image, "container_name": "ray_container", "pull_before_run": True},
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
        "head_node_type": "head",
        "available_node_types": node_types,
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {env} ray start --head --port={GCS_PORT} --num-cpus=0 --dashboard-host=127.0.0.1 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": ["ray stop", f"ulimit -n 65536; {env} ray start --address=$RAY_HEAD_IP:{GCS_PORT}"],
    }]


# --- command line ------------------------------------------------------------------------------

RENDERERS: dict[str, Callable[[PipelineConfig, Options], list[dict]]] = {
    "rayjob": render_rayjob,
    "raycluster": render_raycluster,
    "rayservice": render_rayservice,
    "launcher": render_launcher,
    "raycronjob": render_raycronjob,
    "cronjob": render_cronjob,
}


def render(cfg: PipelineConfig, kind: str, opts: Options | None = None) -> list[dict]:
    """The documents of one kind, the main object (`ray.io` for KubeRay) first."""
    if kind not in RENDERERS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(RENDERERS)}")
    return RENDERERS[kind](cfg, opts or Options())


def _override(cfg: PipelineConfig, model: str | None, storage: str | None) -> PipelineConfig:
    if model:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": model})})
    if storage:
        cfg = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"storage": storage})})
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="print the manifest of one kind as YAML")
    p.add_argument("--config", required=True, help="pipeline definition (YAML)")
    p.add_argument("--kind", required=True, choices=list(RENDERERS))
    p.add_argument("--image", default=DEFAULT_IMAGE, help="container image with this project installed")
    p.add_argument("--namespace", help="Kubernetes namespace of every object")
    p.add_argument("--model", help="override serve.model (an exported student: s3:// on a cluster)")
    p.add_argument("--storage", help="override resources.storage (s3://bucket/prefix on a cluster)")
    p.add_argument("--auth-secret", help="Secret with key auth_token (default <name>-ray-token)")
    p.add_argument("--storage-secret", help="Secret of storage credentials as environment variables "
                                            "(default <name>-storage when the definition uses s3:// and no --service-account)")
    p.add_argument("--service-account", help="service account of every pod (e.g. bound to an IAM role)")
    p.add_argument("--serve-service-type", default="ClusterIP", choices=SERVICE_TYPES,
                   help="RayService: the Serve Service's type (not ClusterIP only with an API key)")
    p.add_argument("--head-memory", default=DEFAULT_MEMORY, help="the head pod's memory")
    p.add_argument("--aws-region", default=Options.aws_region, help="launcher: AWS region")
    p.add_argument("--head-instance-type", default=Options.head_instance_type, help="launcher: the head's EC2 type")
    p.add_argument("--cpu-instance-type", default=Options.cpu_instance_type, help="launcher: CPU workers' EC2 type")
    p.add_argument("--gpu-instance-type", default=Options.gpu_instance_type,
                   help="launcher: GPU workers' EC2 type (at least the node type's CPUs and GPUs)")
    p.add_argument("--instance-profile", help="launcher: IAM instance profile ARN for storage access")
    args = parser.parse_args(argv)
    try:
        cfg = _override(load_pipeline_config(args.config), args.model, args.storage)
        opts = Options(image=args.image, namespace=args.namespace, auth_secret=args.auth_secret,
                       storage_secret=args.storage_secret, service_account=args.service_account,
                       serve_service_type=args.serve_service_type, head_memory=args.head_memory,
                       aws_region=args.aws_region, head_instance_type=args.head_instance_type,
                       cpu_instance_type=args.cpu_instance_type, gpu_instance_type=args.gpu_instance_type,
                       instance_profile=args.instance_profile)
        docs = render(cfg, args.kind, opts)
    except (PipelineConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    if args.kind != "rayservice" and not cfg.resources.storage.startswith("s3://"):
        print(f"warning: resources.storage {cfg.resources.storage!r} is local to each pod or node; a multi-node run "
              "needs shared storage: pass --storage s3://bucket/prefix", file=sys.stderr)
    print(f"# generated by: python -m pipelines.cluster {' '.join(argv if argv is not None else sys.argv[1:])}")
    sys.stdout.write(to_yaml_documents(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
