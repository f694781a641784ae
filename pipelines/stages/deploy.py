"""Deploy stage: serve the exported student over HTTP with Ray Serve (pipelines/serve).

Connects to the running Ray cluster (or starts a local one), deploys the application built from
the definition's `serve` section and prints its URL. On a cluster the app outlives this driver;
when this process started Ray itself, the app lives only as long as the process.
"""

from __future__ import annotations

import ray
from ray import serve

from pipelines.ray_compat import serve_http_address
from pipelines.ray_runtime import ensure_ray
from pipelines.schema import PipelineConfig
from pipelines.serve import app_name, build_app
from pipelines.serve.app import model_user_config


def run(cfg: PipelineConfig) -> dict:
    s = cfg.serve
    started_ray = not ray.is_initialized()
    ensure_ray(cfg)  # joins RAY_ADDRESS / the job's cluster, else starts a local Ray
    serve.start(http_options={"host": s.host, "port": s.port})
    name = app_name(cfg)
    model = model_user_config(cfg)
    print(f"[deploy] deploying {name}: model {model['model_id']} from {model['model']}", flush=True)
    serve.run(build_app(cfg), name=name, route_prefix=s.route_prefix, blocking=False)
    host, port = serve_http_address()  # Serve keeps the http_options it first started with
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{s.route_prefix.rstrip('/')}/"
    print(f"[deploy] {name} is serving at {url}  (playground: {url}, API: {url}v1/images/generations)", flush=True)
    if started_ray:
        print("[deploy] note: this process started Ray, so the app stops when it exits; deploy to a cluster "
              "(ray job submit, or `serve deploy` of the generated config) for a lasting service", flush=True)
    return {"app": name, "url": url, "model": model}
