"""The model cache's one-off staging: a Kubernetes Job that downloads the teacher into the
shared Hugging Face cache (`cluster.model_cache`) once, before any Ray pod reads it.

    python -m pipelines.cluster render --config my.yaml --kind cache > cache-job.yaml
    kubectl apply -f cache-job.yaml && kubectl wait --for=condition=complete job/swd-<name>-cache

The Job runs `python -m pipelines.cluster stage-cache --teacher <teacher.path>` in the project's
image with HF_TOKEN and the cache mounted read-write at HF_HOME; the same command stages a cache
from any machine that mounts the volume (HF_HOME=<mount> HF_TOKEN=... python -m ...).
"""

from __future__ import annotations

from pipelines.cluster.pods import HF_TOKEN_KEY, cache_volume, metadata, pod_spec, resource_name
from pipelines.schema import PipelineConfig

STAGE_SECONDS = 4 * 3600  # FLUX.1-dev with its T5 is ~33 GB: hours on a slow link, then give up


def stage_command(cfg: PipelineConfig) -> list[str]:
    return ["python", "-m", "pipelines.cluster", "stage-cache", "--teacher", cfg.teacher.path]


def render_cache_job(cfg: PipelineConfig) -> list[dict]:
    c = cfg.cluster
    if c.model_cache is None:
        raise ValueError("--kind cache: the definition has no cluster.model_cache (a PersistentVolumeClaim or a "
                         "volume that every pod mounts at HF_HOME)")
    volume, mount = cache_volume(cfg, read_only=False)
    env = [{"name": "HF_HOME", "value": c.model_cache.path}, {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"}]
    if c.hf_token_secret:
        env.append({"name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": c.hf_token_secret, "key": HF_TOKEN_KEY}}})
    amounts = {"cpu": "2", "memory": "8Gi"}
    container = {"name": "stage-cache", "image": c.image, "command": stage_command(cfg), "env": env,
                 "resources": {"limits": dict(amounts), "requests": dict(amounts)}, "volumeMounts": [mount]}
    pod = {"restartPolicy": "Never", **pod_spec(cfg, [container], [volume])}
    spec = {"backoffLimit": 2, "activeDeadlineSeconds": STAGE_SECONDS, "template": {"spec": pod}}
    return [{"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata(cfg, f"{resource_name(cfg)}-cache"),
             "spec": spec}]


def stage(teacher: str) -> str:
    """Download what `from_pretrained(teacher)` loads into HF_HOME (not the repo's other files,
    e.g. single-file checkpoints) and return the snapshot's folder."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.download(teacher)
