"""Deploy stage: serve the exported student over HTTP with Ray Serve (pipelines/serve).

Connects to the running Ray cluster (or starts a local one), deploys the application built from
the definition's `serve` section and prints its URL. On a cluster the app outlives this driver
and the stage returns. When this process started Ray itself, the app lives only as long as the
process, so the stage keeps serving in the foreground until interrupted (as `serve run` does).
"""

from __future__ import annotations

import time

from ray import serve

from pipelines.logs import logger
from pipelines.ray_compat import serve_http_address, started_ray_here
from pipelines.ray_runtime import ensure_ray
from pipelines.schema import PipelineConfig
from pipelines.serve import app_name, build_app
from pipelines.serve.app import model_user_config

log = logger(__name__)


def run(cfg: PipelineConfig) -> dict:
    s = cfg.serve
    ensure_ray(cfg)  # joins RAY_ADDRESS / the job's cluster / this machine's cluster, else starts one
    started_ray = started_ray_here()
    if warning := s.exposure_warning():
        log.warning(warning)
    serve.start(http_options={"host": s.listen_host, "port": s.port})
    name = app_name(cfg)
    model = model_user_config(cfg)
    log.info(f"deploying {name}: model {model['model_id']} from {model['model']}")
    serve.run(build_app(cfg), name=name, route_prefix=s.route_prefix, blocking=False)
    host, port = serve_http_address()  # Serve keeps the http_options it first started with
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{s.route_prefix.rstrip('/')}/"
    log.info(f"{name} is serving at {url}  (playground: {url}, API: {url}v1/images/generations)")
    if started_ray:
        log.info("this process started Ray, so the app lives as long as it does: serving until "
                 "interrupted (Ctrl-C). For a lasting service, deploy to a cluster (RAY_ADDRESS, ray job submit, "
                 "or `serve deploy` of the generated config)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (pipelines/stopping.py): the app goes with the process
            serve.shutdown()
            raise
    return {"app": name, "url": url, "model": model}
