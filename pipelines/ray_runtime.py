"""Start or join Ray for a stage run from the command line, and keep its output readable.

`ray.init()` joins the cluster named by RAY_ADDRESS (or the one `ray job submit` runs in) and
otherwise starts a local one; an already initialised process (tests, notebooks) is left as is.
"""

from __future__ import annotations

import os
import sys

from pipelines.logs import LEVEL_ENV

# What every job's runtime env sets: cluster/runtime_env.yaml for `ray job submit`, the rendered
# RayJob, RayCronJob and CronJob, and the Serve app's config. No download or "Loading weights"
# bars: a job log is not a terminal.
JOB_ENV_VARS = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}


def interactive() -> bool:
    """Whether stdout is a terminal (not `| tee log`, a file or a Ray job log)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker of a stage needs."""
    import torch

    # OMP_WAIT_POLICY: idle OpenMP threads sleep instead of spinning; workers, actors and the
    # driver share cores, and spinning threads slow each other down many times over.
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           # a worker's output reaches the driver's log, never a terminal: no "Loading weights" bar
           # per weight load (huggingface_hub and transformers read this at import) and no info logs.
           # diffusers' bars have no variable: quiet_libraries() at each worker's entry point.
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    if not interactive():
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # a Dataset made in a worker follows the driver
    if LEVEL_ENV in os.environ:  # --quiet / --verbose (pipelines/logs.py)
        env[LEVEL_ENV] = os.environ[LEVEL_ENV]
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed probes for CUDA otherwise and fails on CPU-only nodes
    return env


def quiet_libraries() -> None:
    """Errors only from diffusers and transformers, and none of their progress bars (one per
    weight load otherwise). Called by the drivers (`quiet_output`) and at the entry point of every
    worker that loads weights: Ray Data actors, Ray Train workers, Serve replicas."""
    import diffusers
    import huggingface_hub
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def quiet_output(tty: bool | None = None) -> None:
    """A driver's output, one readable line per event: `quiet_libraries`, and when stdout is not a
    terminal (`tty` None: checked here) no Ray Data progress bars either, which there print
    escape codes and a line per redraw for every operator."""
    quiet_libraries()
    if tty is None:
        tty = interactive()
    if not tty:
        from ray.data import DataContext

        # the driver prints the workers' lines; uncoloured, their "(pid=...)" prefixes carry no escape codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        from pipelines.ray_compat import uncoloured_dedup_notes

        uncoloured_dedup_notes()

        # a Dataset copies the driver's context when it is made, so this reaches the executors
        # that run it (Ray Train's split coordinator included)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False


def ensure_ray(cfg=None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Inside `ray job submit` the job's runtime env (working dir, env vars) applies; Ray merges a
    # runtime env given here into it and refuses a key both set (an env var of the job's), so
    # it is only given when joining or starting a cluster directly.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    kwargs = {} if in_job else {"runtime_env": {"env_vars": worker_env()}}
    from pipelines.stopping import across_ray_init

    with across_ray_init():  # ray.init replaces the entry point's SIGTERM handler (pipelines/stopping.py)
        verbose = os.environ.get(LEVEL_ENV) == "DEBUG"  # --verbose: Ray's own info lines too
        ray.init(ignore_reinit_error=True, logging_level="INFO" if verbose else "WARNING", log_to_driver=True,
                 **kwargs)
