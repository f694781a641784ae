"""Start or join Ray for a stage run from the command line.

`ray.init()` joins the cluster named by RAY_ADDRESS (or the one `ray job submit` runs in) and
otherwise starts a local one; an already initialised process (tests, notebooks) is left as is.
"""

from __future__ import annotations

import os


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker of a stage needs."""
    import torch

    # OMP_WAIT_POLICY: idle OpenMP threads sleep instead of spinning; workers, actors and the
    # driver share cores, and spinning threads slow each other down many times over.
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed probes for CUDA otherwise and fails on CPU-only nodes
    return env


def ensure_ray(cfg=None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Inside `ray job submit` the job's runtime env (working dir, env vars) applies; a runtime
    # env given here would replace it, so it is only set when joining or starting a cluster directly.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    kwargs = {} if in_job else {"runtime_env": {"env_vars": worker_env()}}
    ray.init(ignore_reinit_error=True, logging_level="WARNING", log_to_driver=True, **kwargs)
