"""Scheduled retraining (a `retrain` section) against the standing RayCluster of `--kind
raycluster`: a KubeRay RayCronJob (KubeRay >= 1.6, alpha, feature gate `RayCronJob`), or for
older operators a Kubernetes CronJob whose pod runs `ray job submit` of one cycle."""

from __future__ import annotations

import json

import yaml

from pipelines.cluster.pods import DASHBOARD_PORT, DEFINITION_DIR, auth_secret, metadata, pod_spec, resource_name
from pipelines.ray_runtime import JOB_ENV_VARS
from pipelines.schema import PipelineConfig

RETRAIN_ENTRYPOINT = f"python -m pipelines.retrain --once --config {DEFINITION_DIR}/definition.yaml"


def _needs_retrain(cfg: PipelineConfig, kind: str) -> None:
    if cfg.retrain is None:
        raise ValueError(f"--kind {kind}: the definition has no `retrain` section (docs/retrain.md)")


def render_raycronjob(cfg: PipelineConfig) -> list[dict]:
    """Each tick, KubeRay creates a RayJob that submits one cycle to the standing RayCluster
    (`clusterSelector`). The operator does not prevent overlapping runs; the cycle's lock does
    (a second exits and changes nothing)."""
    _needs_retrain(cfg, "raycronjob")
    job = {
        "entrypoint": RETRAIN_ENTRYPOINT,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": dict(JOB_ENV_VARS)}, sort_keys=False),
        "clusterSelector": {"ray.io/cluster": resource_name(cfg)},
        # a cycle that fails is resumed by the next tick, not retried at once
        "backoffLimit": 0,
    }
    if cfg.cluster.active_deadline_seconds:
        job["activeDeadlineSeconds"] = cfg.cluster.active_deadline_seconds
    spec = {"schedule": cfg.retrain.schedule, "timeZone": cfg.retrain.timezone, "jobTemplate": job}
    return [{"apiVersion": "ray.io/v1", "kind": "RayCronJob",
             "metadata": metadata(cfg, f"{resource_name(cfg)}-retrain"), "spec": spec}]


def render_cronjob(cfg: PipelineConfig) -> list[dict]:
    """A Kubernetes CronJob (any KubeRay version): its pod submits one cycle to the standing
    RayCluster's job API with the cluster's token; `concurrencyPolicy: Forbid` skips a tick while
    the previous cycle's submitter still runs (and the cycle's lock guards the rest)."""
    _needs_retrain(cfg, "cronjob")
    name = resource_name(cfg)
    submit = ["ray", "job", "submit", "--address", f"http://{name}-head-svc:{DASHBOARD_PORT}",
              "--runtime-env-json", json.dumps({"env_vars": dict(JOB_ENV_VARS)}), "--", *RETRAIN_ENTRYPOINT.split()]
    container = {"name": "submit-cycle", "image": cfg.cluster.image, "command": submit,
                 "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                         {"name": "RAY_AUTH_TOKEN",
                          "valueFrom": {"secretKeyRef": {"name": auth_secret(cfg), "key": "auth_token"}}}],
                 "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}}
    pod = {"restartPolicy": "Never", **pod_spec(cfg, [container])}
    job = {"backoffLimit": 0, "template": {"spec": pod}}
    if cfg.cluster.active_deadline_seconds:
        job["activeDeadlineSeconds"] = cfg.cluster.active_deadline_seconds
    spec = {"schedule": cfg.retrain.schedule, "timeZone": cfg.retrain.timezone, "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3, "jobTemplate": {"spec": job}}
    return [{"apiVersion": "batch/v1", "kind": "CronJob", "metadata": metadata(cfg, f"{name}-retrain"), "spec": spec}]
