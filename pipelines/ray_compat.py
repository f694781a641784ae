"""Every use of a private Ray API, in one place.

Each name below is one no public Ray API (Ray 2.60) replaces; the docstrings say why.
tests/test_ray_compat.py imports each private name, so an upgrade that moves one fails there
rather than silently in a training run or a deployment.
"""

from __future__ import annotations

import logging

# Ray Train's print patch tees each print of a worker to the driver besides its stdout, which Ray
# already forwards there: every progress line would show twice. The switch is an environment
# variable read by `ray.train.v2._internal.logging.patch_print`; no public option turns it off.
TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def quiet_train_report_log() -> None:
    """Ray Train logs every `report` at INFO with all its metrics, from every rank; the progress
    line says the same once. Its logger is named after its file, so RunConfig's LoggingConfig
    (which filters loggers named `ray.train*`) does not reach it, and no public API names it: it
    is found through its private module."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def uncoloured_dedup_notes() -> None:
    """The driver's "[repeated Nx across cluster]" notes, which Ray wraps in colour codes
    unconditionally (RAY_COLOR_PREFIX reaches only the "(pid=...)" prefixes), in plain text: a
    job log read as a file. The wrapper is a private module function; no setting turns it off
    short of disabling the deduplication, which prints every worker's copy of each line."""
    try:
        from ray._private import ray_logging
    except ImportError:  # another Ray layout: leave its notes as they are
        return
    if callable(getattr(ray_logging, "_color", None)):
        ray_logging._color = str


def serve_http_address() -> tuple[str, int]:
    """(host, port) of the HTTP options Serve runs with. Serve keeps the `http_options` it was first
    started with, so only its controller knows the ones in effect; `serve.status()` does not say
    them, and the REST API that does (`GET /api/serve/applications/`) needs the dashboard."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return http.host, http.port


def deployment_version(version: str) -> dict:
    """Deployment options that set its code version: `.options(**deployment_version(v))`.
    `@serve.deployment` and `.options()` refuse a public `version`; `.options()` still takes it
    with `_internal`, the flag Serve sets when it calls the method itself. Without a version of
    its own choosing, `serve.run` gives each deployment a random one, and every redeploy would
    restart all replicas."""
    return {"version": version, "_internal": True}


def session_logs_dir() -> str:
    """The logs folder of the Ray session this process is connected to (tests search every log of
    their cluster in it). No public API names it; the value `ray.init` returns holds the session
    folder only for the caller of `ray.init`."""
    import ray._private.worker

    return ray._private.worker._global_node.get_logs_dir_path()


def started_ray_here() -> bool:
    """Whether this process started the Ray instance it is connected to (as opposed to joining
    a cluster: RAY_ADDRESS, `ray job submit`, or the machine's running cluster, which a bare
    `ray.init()` also joins). Then what it deploys lives only as long as the process. The driver's
    node object says so; no public API does."""
    from ray._private import worker

    node = worker._global_node
    return node is not None and node.is_head()
