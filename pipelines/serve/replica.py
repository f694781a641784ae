"""What a Serve replica runs, and all it is given: the deployments' init args and version.

A replica reads only these settings; the rest of the definition (data, distill, retrain,
evaluate, storage root, Serve's own routing and scaling options) never reaches it. The
deployments' code version hashes exactly this and the package's code, so a redeploy after new
data or other training settings is an in-place reconfigure (a new model through `user_config`)
with the same replicas, not a restart.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipelines.schema import PipelineConfig, ResourcesConfig, S3Config


class ReplicaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the playground's title
    family: str  # how the exported student loads (teacher.family, teacher.dtype)
    dtype: str
    s3: S3Config  # where an s3:// model is read from
    cpus: float  # serve.cpus_per_replica: torch threads
    gpus: float  # serve.gpus_per_replica: the device
    max_batch_size: int
    batch_wait_timeout_s: float
    deterministic_batching: bool
    max_images: int  # the ingress's request limits and auth
    max_prompt_chars: int
    api_key_env: str | None
    api_key_file: str | None

    @classmethod
    def of(cls, cfg: PipelineConfig) -> ReplicaConfig:
        s = cfg.serve
        return cls(name=cfg.name, family=cfg.teacher.family, dtype=cfg.teacher.dtype, s3=cfg.resources.s3,
                   cpus=s.cpus_per_replica, gpus=s.gpus_per_replica, max_batch_size=s.max_batch_size,
                   batch_wait_timeout_s=s.batch_wait_timeout_s, deterministic_batching=s.deterministic_batching,
                   max_images=s.max_images, max_prompt_chars=s.max_prompt_chars, api_key_env=s.api_key_env,
                   api_key_file=s.api_key_file)

    @property
    def resources(self) -> ResourcesConfig:
        return ResourcesConfig(s3=self.s3)
