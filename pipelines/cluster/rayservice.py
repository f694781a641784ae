"""The RayService serving the distilled student: the Serve config of `pipelines.serve.config`
inside a KubeRay cluster of generator pods."""

from __future__ import annotations

from pipelines.cluster.pods import metadata, ray_cluster_spec, resource_name
from pipelines.cluster.shapes import serve_groups
from pipelines.schema import PipelineConfig
from pipelines.yaml_text import to_yaml


def render_rayservice(cfg: PipelineConfig) -> list[dict]:
    """The head runs Serve's controller and a proxy; generator replicas run on the worker group.
    The Serve Service carries only Serve's port; it leaves the cluster (a LoadBalancer or
    NodePort) only behind an API key."""
    from pipelines.serve.config import serve_config  # imports Ray Serve: only here

    s, service_type = cfg.serve, cfg.cluster.serve_service_type
    if service_type != "ClusterIP" and not (s.api_key_env or s.api_key_file):
        raise ValueError(f"cluster.serve_service_type {service_type} would expose the model without a key: set "
                         "serve.api_key_env (or serve.api_key_file) in the definition, or keep ClusterIP")
    serve_port = {"containerPort": s.port, "name": "serve"}
    config = serve_config(cfg)
    # In a pod the proxy must listen on the pod's address for the Service to reach it; the Service
    # (ClusterIP unless keyed, checked above) is what bounds who reaches it.
    config["http_options"]["host"] = s.host or "0.0.0.0"
    spec = {
        "serveConfigV2": to_yaml(config),
        "rayClusterConfig": ray_cluster_spec(cfg, serve_groups(cfg), autoscale=s.min_replicas is not None,
                                             head_ports=[serve_port]),
        "serveService": {"spec": {"type": service_type,
                                  "ports": [{"name": "serve", "port": s.port, "targetPort": s.port}]}},
    }
    return [{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": metadata(cfg, resource_name(cfg)),
             "spec": spec}]
