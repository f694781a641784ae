"""The application builder: pipeline definition -> Ray Serve application (ingress + generator).

The same builder serves every way of running the app:
    the pipeline's deploy stage         pipelines/stages/deploy.py
    serve run                           serve run pipelines.serve.app:app_builder config=pipelines/configs/toy.yaml
    serve deploy / KubeRay RayService   a config file from `python -m pipelines.serve.config` (args: the definition)
"""

# No `from __future__ import annotations`: Serve reads `app_builder`'s annotation as a class to
# validate the args into it, and a postponed annotation is only a string.

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.serve import Application

from pipelines.ray_compat import deployment_version
from pipelines.ray_runtime import JOB_ENV_VARS
from pipelines.schema import PipelineConfig, load_pipeline_config, parse_pipeline_config
from pipelines.serve.generator import Generator
from pipelines.serve.ingress import Ingress
from pipelines.serve.model import default_model_source
from pipelines.serve.replica import ReplicaConfig

# The ingress only validates and awaits handles: it holds many requests at once and needs no
# CPU reservation (which would take a core from the generator on a small node).
INGRESS_MAX_ONGOING = 1000


def replica_runtime_env() -> dict:
    """The replicas' own runtime env. Without one, `serve.run` gives them the deploying driver's
    (a terminal's, a CronJob's, a test's), which is part of Serve's version: a rollback from
    another process than the promotion's would restart every replica."""
    return {"env_vars": {**JOB_ENV_VARS, "OMP_WAIT_POLICY": "PASSIVE"}}


def app_name(cfg: PipelineConfig) -> str:
    return cfg.serve.app_name or f"swd-{cfg.name}"


def model_user_config(cfg: PipelineConfig) -> dict:
    """The generator's `user_config`: changing it on a running app is a hot swap (reconfigure)."""
    return {"model": default_model_source(cfg), "model_id": cfg.serve.model_id or f"{cfg.name}-swd"}


def replica_args(cfg: PipelineConfig) -> dict:
    """The deployments' init args: only what a replica runs (pipelines/serve/replica.py). Neither
    the model (`user_config`: a new one is an in-place reconfigure) nor anything a replica does
    not read (new data, training settings) is in them, so neither restarts replicas."""
    return ReplicaConfig.of(cfg).model_dump(mode="json")


def generator_options(cfg: PipelineConfig) -> dict:
    s = cfg.serve
    opts = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica,
                              "runtime_env": replica_runtime_env()},
        "user_config": model_user_config(cfg),
        "health_check_period_s": 10,
    }
    if s.min_replicas is not None:
        opts["autoscaling_config"] = {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas, "initial_replicas": max(s.min_replicas, 1),
            "target_ongoing_requests": s.target_ongoing_requests or s.max_batch_size,
        }
    else:
        opts["num_replicas"] = s.replicas
    return opts


def ingress_options(cfg: PipelineConfig) -> dict:
    # Backpressure is the generator's (its queue limit becomes a JSON 503 with a message); the
    # ingress queue is only a last guard, so the proxy's plain-text 503 stays rare.
    return {"num_replicas": 1, "max_ongoing_requests": INGRESS_MAX_ONGOING,
            "max_queued_requests": INGRESS_MAX_ONGOING,
            "ray_actor_options": {"num_cpus": 0, "runtime_env": replica_runtime_env()}}


def code_version(args: dict) -> str:
    """`serve run` gives deployments a random code version, so every redeploy would restart all
    replicas; `serve deploy` derives it from the config instead. Same here: a hash of the init
    args (what a replica runs) and this package's code. A redeploy that changes neither is an
    in-place reconfigure on the same replicas; any other change restarts them (Serve's rolling
    update). Serve's own options (replicas, resources, queue limits) it versions itself."""
    h = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        h.update(source.read_bytes())
    return h.hexdigest()[:16]


def build_app(cfg: PipelineConfig) -> Application:
    args = replica_args(cfg)
    version = deployment_version(code_version(args))
    generator = Generator.options(**generator_options(cfg), **version).bind(args)
    return Ingress.options(**ingress_options(cfg), **version).bind(generator, args)


class AppArgs(BaseModel):
    """The builder's arguments (`serve run ... key=value`, or a Serve config file's `args`): exactly
    one of `config` and `definition`. Serve validates the args into this model before it calls
    `app_builder`, so a wrong key fails there, naming itself, before anything is deployed."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="a pipeline definition file (YAML)")
    definition: dict[str, Any] | None = Field(
        None, description="the pipeline definition itself, as the generated Serve config carries it")

    @model_validator(mode="before")
    @classmethod
    def exactly_one_source(cls, data: Any) -> Any:
        # Before field validation, so a misspelt key reads as what it is rather than as "extra".
        if isinstance(data, dict) and ("config" in data) == ("definition" in data):
            raise ValueError("app_builder takes config=<pipeline definition file> or a 'definition' mapping, "
                             f"exactly one of them; got {sorted(data) or 'no args'}")
        return data


def app_builder(args: AppArgs) -> Application:
    """Entry point for `serve run` and Serve config files (Serve builds `args` from their key/values)."""
    if args.definition is not None:
        return build_app(parse_pipeline_config(args.definition, "serve args 'definition'"))
    return build_app(load_pipeline_config(args.config))
