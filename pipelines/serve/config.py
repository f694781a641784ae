"""Serve config files generated from the pipeline definition, for `serve deploy` and KubeRay.

    python -m pipelines.serve.config --config pipelines/configs/toy.yaml > serve.yaml
    serve deploy serve.yaml --address http://HEAD:8265
    python -m pipelines.serve.config --config my.yaml --rayservice --image REGISTRY/swd-ray:TAG > rayservice.yaml
    kubectl apply -f rayservice.yaml

The application entry names the same builder as the deploy stage (`pipelines.serve.app:app_builder`)
with the whole definition as its args; the `deployments` entries restate the options the builder
sets (same functions, so they cannot drift) so operators can edit them in place. Editing the
generator's `user_config.model` and deploying again hot-swaps the model without a restart.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from pipelines.schema import PipelineConfig, PipelineConfigError, load_pipeline_config
from pipelines.serve.app import app_name, generator_options, ingress_options, model_user_config

IMPORT_PATH = "pipelines.serve.app:app_builder"
# Set on every replica, as cluster/runtime_env.yaml does for jobs.
ENV_VARS = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}


def serve_config(cfg: PipelineConfig, proxy_location: str = "EveryNode") -> dict:
    """A Serve config (ray.serve.schema.ServeDeploySchema) for this definition's application."""
    s = cfg.serve
    definition = cfg.model_dump(mode="json")
    definition["serve"].update(model_user_config(cfg))  # resolved, so the file is self-contained
    deployments = [{"name": "Generator", **generator_options(cfg)}, {"name": "Ingress", **ingress_options(cfg)}]
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": s.host, "port": s.port},
        "applications": [{
            "name": app_name(cfg), "route_prefix": s.route_prefix, "import_path": IMPORT_PATH,
            "args": {"definition": definition}, "runtime_env": {"env_vars": dict(ENV_VARS)},
            "deployments": deployments,
        }],
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the RayService's embedded Serve config), no anchors."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def to_yaml(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def _container(name: str, image: str, cpus: float, gpus: float, env: list[dict], ports: list[dict]) -> dict:
    limits = {"cpu": str(cpus), "memory": "8Gi", **({"nvidia.com/gpu": str(int(gpus))} if gpus else {})}
    return {"name": name, "image": image, "ports": ports, "env": env,
            "resources": {"limits": limits, "requests": {"cpu": str(cpus), "memory": "8Gi"}}}


def rayservice_manifest(cfg: PipelineConfig, image: str) -> dict:
    """A KubeRay RayService: the Serve config above plus a Ray cluster (a head with the proxy and
    dashboard, a worker group sized for the generator replicas). The API key, if any, comes from
    a Kubernetes Secret `<app>-api-key` into the variable the definition names."""
    s = cfg.serve
    name = app_name(cfg)
    env = []
    if s.api_key_env:
        env.append({"name": s.api_key_env, "valueFrom": {"secretKeyRef": {"name": f"{name}-api-key", "key": "key"}}})
    cpus = max(1.0, s.cpus_per_replica)
    gpus = s.gpus_per_replica
    replicas = s.max_replicas or s.replicas
    workers = {
        "groupName": "generator", "replicas": s.min_replicas if s.min_replicas is not None else s.replicas,
        "minReplicas": s.min_replicas if s.min_replicas is not None else s.replicas, "maxReplicas": replicas,
        "rayStartParams": {},
        "template": {"spec": {"containers": [_container("ray-worker", image, cpus, gpus, env, [])]}},
    }
    head_ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": s.port, "name": "serve"}]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name},
        "spec": {
            "serveConfigV2": to_yaml(serve_config(cfg)),
            "rayClusterConfig": {
                "enableInTreeAutoscaling": s.min_replicas is not None,
                "headGroupSpec": {
                    # num-cpus 0: no generator replica lands on the head; it runs the proxy and controller.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"spec": {"containers": [_container("ray-head", image, 2, 0, env, head_ports)]}},
                },
                "workerGroupSpecs": [workers],
            },
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline definition (YAML)")
    parser.add_argument("--rayservice", action="store_true", help="write a KubeRay RayService manifest instead")
    parser.add_argument("--image", default="rayproject/ray:2.60.0-py311",
                        help="container image with this project installed (RayService only)")
    parser.add_argument("--model", help="override serve.model (an exported student: local path or s3://)")
    args = parser.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.config)
    except PipelineConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if args.model:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"model": args.model})})
    doc = rayservice_manifest(cfg, args.image) if args.rayservice else serve_config(cfg)
    print(f"# generated by: python -m pipelines.serve.config {' '.join(argv if argv is not None else sys.argv[1:])}")
    sys.stdout.write(to_yaml(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
