"""Cluster manifests rendered from the pipeline definition: KubeRay objects, a Ray cluster
launcher file, and the model cache's staging Job.

    python -m pipelines.cluster render --config pipelines/configs/sd35_large_4step.yaml --kind rayjob \\
        --image REGISTRY/swd-ray:TAG > rayjob.yaml
    kubectl apply -f rayjob.yaml

Kinds (docs/cluster.md says how to run each):
  rayjob       a KubeRay RayJob: a Ray cluster made for one run of the pipeline (deploy and preview
               left out), then teardown; followed by the ConfigMap holding the definition it runs
  raycluster   a standing KubeRay RayCluster sized for the pipeline, for `ray job submit`
  rayservice   a KubeRay RayService serving the distilled student
  launcher     a Ray cluster launcher file for AWS (`ray up`)
  raycronjob   scheduled retraining (a `retrain` section): a KubeRay RayCronJob (KubeRay >= 1.6,
               alpha, feature gate `RayCronJob`) submitting `pipelines.retrain --once` to the
               standing RayCluster of `--kind raycluster`
  cronjob      the same for older operators: a Kubernetes CronJob whose pod runs `ray job submit`
  cache        a Job that downloads the teacher into the shared model cache once (cluster.model_cache)

The definition's `cluster` section says where and how (image, Secrets, model cache, GPU nodes,
deadlines); each of its fields is also a flag of `render` (`--gpu-memory 141G`), which wins.
Every KubeRay cluster turns on Ray token authentication from a Secret (key `auth_token`); the
head's Service stays ClusterIP, so the dashboard and job API (8265) and the client port (10001)
are reachable only inside the cluster or through `kubectl port-forward`. Only Serve's port can
be exposed beyond the cluster, and only when the definition sets an API key.

Modules: `shapes` (units and pod shapes), `pods` (what every pod and RayClusterSpec shares),
one per kind (`rayjob`, `raycluster`, `rayservice`, `cron`, `cache`, `launcher`), `crd`
(strict validation against the vendored CRDs) and `cli`.
"""

from __future__ import annotations

from typing import Callable

from pipelines.cluster.cache import render_cache_job
from pipelines.cluster.cron import render_cronjob, render_raycronjob
from pipelines.cluster.launcher import render_launcher
from pipelines.cluster.pods import RAY_VERSION, resource_name
from pipelines.cluster.raycluster import render_raycluster
from pipelines.cluster.rayjob import job_definition, rayjob_spec, render_rayjob
from pipelines.cluster.rayservice import render_rayservice
from pipelines.cluster.shapes import Unit, WorkerGroup, pipeline_units, size_groups
from pipelines.ray_runtime import JOB_ENV_VARS
from pipelines.schema import ClusterConfig, PipelineConfig

RENDERERS: dict[str, Callable[[PipelineConfig], list[dict]]] = {
    "rayjob": render_rayjob,
    "raycluster": render_raycluster,
    "rayservice": render_rayservice,
    "launcher": render_launcher,
    "raycronjob": render_raycronjob,
    "cronjob": render_cronjob,
    "cache": render_cache_job,
}
NO_IMAGE = ("raycronjob",)  # its RayJobs run on the standing cluster's pods


def with_cluster(cfg: PipelineConfig, cluster: ClusterConfig | dict) -> PipelineConfig:
    """`cfg` with its cluster section replaced (a ClusterConfig) or updated (a mapping), validated again."""
    data = cfg.model_dump(mode="json")
    data["cluster"] = (cluster.model_dump(mode="json") if isinstance(cluster, ClusterConfig)
                       else {**data["cluster"], **cluster})
    return PipelineConfig.model_validate(data)


def kind_definition(cfg: PipelineConfig, kind: str) -> PipelineConfig:
    """The definition as the kind's cluster runs it: its stages decide the pods and the checks."""
    if kind == "rayjob":
        return job_definition(cfg)
    if kind == "rayservice":
        return cfg.model_copy(update={"stages": ["deploy"]})
    return cfg


def render(cfg: PipelineConfig, kind: str, cluster: ClusterConfig | dict | None = None) -> list[dict]:
    """The documents of one kind, the main object (`ray.io` for KubeRay) first; `cluster`
    replaces or updates the definition's cluster section."""
    if kind not in RENDERERS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(RENDERERS)}")
    if cluster is not None:
        cfg = with_cluster(cfg, cluster)
    if cfg.cluster.image is None and kind not in NO_IMAGE:
        raise ValueError(f"cluster.image: --kind {kind} needs an image with this project installed: build "
                         "cluster/Dockerfile (`make image`), push it, and pass --image REGISTRY/swd-ray:TAG "
                         "(or set cluster.image)")
    return RENDERERS[kind](cfg)


__all__ = ["JOB_ENV_VARS", "RAY_VERSION", "RENDERERS", "Unit", "WorkerGroup", "kind_definition", "pipeline_units",
           "render", "rayjob_spec", "resource_name", "size_groups", "with_cluster"]
