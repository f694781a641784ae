"""The standing RayCluster, for `ray job submit` and scheduled retraining."""

from __future__ import annotations

from pipelines.cluster.pods import definition_configmap, definition_mount, metadata, ray_cluster_spec, resource_name
from pipelines.cluster.shapes import pipeline_groups, serve_groups
from pipelines.schema import PipelineConfig


def render_raycluster(cfg: PipelineConfig) -> list[dict]:
    """A standing cluster for the pipeline, with the definition mounted on the head. With a
    `retrain` section it is also where cycles run and the Serve app lives: generator pods
    beside the pipeline's groups, since serving goes on while a cycle trains. Idle pods go
    after `cluster.idle_timeout_seconds`."""
    groups = pipeline_groups(cfg)
    if cfg.retrain is not None:
        groups += serve_groups(cfg)
    mounts, volumes = definition_mount(cfg)
    spec = ray_cluster_spec(cfg, groups, autoscale=True, head_mounts=mounts, head_volumes=volumes,
                            head_ports=[{"containerPort": cfg.serve.port, "name": "serve"}] if cfg.retrain else ())
    return [{"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata(cfg, resource_name(cfg)),
             "spec": spec}, definition_configmap(cfg)]
