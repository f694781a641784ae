"""Where a stage's model runs: on the accelerator its Ray resources gave this process, else the CPU.

Ray assigns GPUs by setting CUDA_VISIBLE_DEVICES in the worker, so the assigned GPU is always
`cuda` (device 0) there. A stage that reserved GPUs in a process that sees no CUDA device (a
CPU-only torch build on a GPU node, a node whose GPUs were declared by hand) would otherwise run
on the CPU for hours without a word; it fails at once instead, naming the setting.
"""

from __future__ import annotations

import os


class PlacementError(RuntimeError):
    """A stage reserved GPUs, but the process Ray gave them to cannot use CUDA."""


def stage_device(stage: str, setting: str, gpus: float) -> str:
    """The torch device for `stage`'s model: "cuda" when `gpus` > 0 (the definition's `setting`
    reserved them), "cpu" otherwise. Raises PlacementError when GPUs are reserved but invisible."""
    if not gpus:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    try:
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - only for the message
        ids = []
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise PlacementError(
        f"{stage}: `{setting}: {gpus:g}` reserves GPUs for this stage, and Ray assigned GPU id(s) {ids} to "
        f"this process (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}), but torch "
        f"{torch.__version__} ({build}) sees no CUDA device here. Install a CUDA build of torch on the GPU nodes "
        f"(e.g. make install TORCH_INDEX=https://download.pytorch.org/whl/cu128), check the node's driver, or set "
        f"`{setting}: 0` to run this stage on CPU.")


def run_as_task(stage: str, fn, *args, cpus: float, gpus: float, memory: int | None = None):
    """Run `fn(*args)` as a Ray task holding the stage's resources (not in the driver, which on a
    cluster is usually the head node, without a GPU) and return its result. The task's output
    reaches the driver's log as any Ray worker's does."""
    import ray

    from pipelines.logs import LEVEL_ENV
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    options = {"num_cpus": cpus, "num_gpus": gpus, "name": stage, "max_retries": 0}
    if memory:
        options["memory"] = memory
    if LEVEL_ENV in os.environ:
        # --quiet / --verbose: inside `ray job submit` the workers run in the job's runtime env,
        # not the one ensure_ray would give them; Ray merges this into it
        options["runtime_env"] = {"env_vars": {LEVEL_ENV: os.environ[LEVEL_ENV]}}
    return ray.get(ray.remote(_quietly).options(**options).remote(fn, *args))


def _quietly(fn, *args):
    """`fn(*args)` in a Ray task process, which the driver's quieting does not reach: no
    "Loading pipeline components" bar per model load in the job's log."""
    from pipelines.ray_runtime import quiet_libraries

    quiet_libraries()
    return fn(*args)
