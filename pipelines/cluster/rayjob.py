"""The RayJob: KubeRay makes a Ray cluster for one run of the pipeline, submits the driver from
a submitter pod with the cluster's token, and deletes the cluster when the job ends.

Its cluster is gone ten minutes after the job, so the RayJob never runs `deploy` or `preview`:
the ConfigMap's definition leaves them out, the pods are sized without them, and `render` says
so (`--kind rayservice` serves the student). The GPU pods are held for the whole run: a stage
that needs fewer (synthesize) would otherwise release them, and distill would wait to win them
back. KubeRay starts the job only when every pod runs, so `start_deadline_seconds`
(`preRunningDeadlineSeconds`) fails a run whose pods stay Pending.
"""

from __future__ import annotations

import yaml

from pipelines.cluster.pods import (
    DEFINITION_DIR,
    definition_configmap,
    definition_mount,
    metadata,
    ray_cluster_spec,
    resource_name,
)
from pipelines.cluster.shapes import pipeline_groups
from pipelines.ray_runtime import JOB_ENV_VARS
from pipelines.schema import PipelineConfig

NOT_IN_A_JOB = ("deploy", "preview")  # Serve on a cluster that is deleted when the job ends
ENTRYPOINT = f"python -m pipelines.distill --config {DEFINITION_DIR}/definition.yaml"
TTL_SECONDS = 600  # the cluster outlives the job by ten minutes: time to read it in the dashboard


def job_definition(cfg: PipelineConfig) -> PipelineConfig:
    """The definition the RayJob runs: its stages without deploy and preview."""
    return cfg.model_copy(update={"stages": [s for s in cfg.stages if s not in NOT_IN_A_JOB]})


def notes(cfg: PipelineConfig) -> list[str]:
    dropped = [s for s in cfg.stages if s in NOT_IN_A_JOB]
    if not dropped:
        return []
    kept = ", ".join(job_definition(cfg).stages) or "no stage"
    return [f"the RayJob runs {kept}; {' and '.join(dropped)} left out: its cluster is deleted when the job ends. "
            "Serve the student with --kind rayservice --model <storage>/<name>/student/merged"]


def rayjob_spec(cfg: PipelineConfig) -> dict:
    """A RayJobSpec for `cfg` as it is (render_rayjob passes `job_definition`), reading the
    definition from the ConfigMap `definition_configmap` renders."""
    mounts, volumes = definition_mount(cfg)
    groups = pipeline_groups(cfg)
    for g in groups:
        if g.gpus:
            g.min_replicas = g.replicas
    spec = {
        "entrypoint": ENTRYPOINT,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": dict(JOB_ENV_VARS)}, sort_keys=False),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": TTL_SECONDS,
    }
    c = cfg.cluster
    if c.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    if c.start_deadline_seconds:
        spec["preRunningDeadlineSeconds"] = c.start_deadline_seconds
    spec["rayClusterSpec"] = ray_cluster_spec(cfg, groups, autoscale=True, head_mounts=mounts, head_volumes=volumes)
    return spec


def render_rayjob(cfg: PipelineConfig) -> list[dict]:
    job_cfg = job_definition(cfg)
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata(cfg, resource_name(cfg)),
           "spec": rayjob_spec(job_cfg)}
    return [job, definition_configmap(job_cfg)]
