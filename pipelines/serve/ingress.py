"""The HTTP ingress (FastAPI): OpenAI-style images API, a PNG endpoint, model info, health and
the playground. It validates every request before anything reaches the generator, so a bad
request costs no model time and cannot disturb a batch; generation goes through a handle to
the generator deployment, one call per image, which Serve batches across requests.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in
# the handlers' signatures (Serve's class-based ingress does not resolve string annotations).
import asyncio
import base64
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.serve.auth import BearerAuth
from pipelines.serve.playground import playground_html
from pipelines.serve.replica import ReplicaConfig
from pipelines.serve.validation import (
    ImageRequest,
    Limits,
    RequestError,
    parse_json_request,
    parse_query_request,
    read_limited_body,
)

log = logging.getLogger("ray.serve")
api = FastAPI(title="SwD generator", docs_url=None, redoc_url=None)
INFO_TTL_S = 1.0  # how stale the cached model info (sizes) used for validation may be


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError):
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    # Unknown routes and wrong methods, in the same error shape as everything else.
    return JSONResponse(RequestError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body(),
                        status_code=err.status_code)


def _model_headers(result: dict) -> dict:
    """Which model made the image and how many requests shared its batch (for clients and tests)."""
    # the model's storage URI is only on the authenticated /v1/models, not on every response
    return {"X-SWD-Model": result["model_id"], "X-SWD-Batch": str(result["batch"])}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, settings: dict):
        self.cfg = ReplicaConfig.model_validate(settings)
        self.generator = generator
        self.auth = BearerAuth.from_config(self.cfg)
        self._info: tuple[float, dict] | None = None

    async def _model_info(self, fresh: bool = False) -> dict:
        now = time.monotonic()
        if fresh or self._info is None or now - self._info[0] > INFO_TTL_S:
            try:
                self._info = (now, await self.generator.info.remote())
            except (BackPressureError, DeploymentUnavailableError) as err:
                raise RequestError(503, f"the generator is unavailable: {type(err).__name__}; retry shortly") from None
        return self._info[1]

    async def _limits(self) -> Limits:
        s = self.cfg
        return Limits(s.max_images, s.max_prompt_chars, tuple((await self._model_info())["sizes"]))

    async def _generate(self, req: ImageRequest) -> tuple[list[int], list[dict]]:
        info = await self._model_info()
        if req.model is not None and req.model != info["id"]:
            raise RequestError(404, f"model {req.model!r} is not served here; available: {info['id']}", "model")
        first = req.seed if req.seed is not None else secrets.randbelow(2**31)
        seeds = [first + i for i in range(req.n)]
        try:
            results = await asyncio.gather(*(self.generator.generate.remote((req.prompt, s)) for s in seeds))
        except BackPressureError:
            # Over capacity: a quick refusal the client can retry, not a hang.
            raise RequestError(503, "server is at capacity; retry shortly") from None
        except DeploymentUnavailableError:
            raise RequestError(503, "the generator is unavailable; retry shortly") from None
        if failed := next((r for r in results if "error" in r), None):
            # validation admits only what the model takes; a failure here is the server's
            raise RequestError(500, f"the model failed on this request: {failed['error']}")
        return seeds, results

    @api.get("/", response_class=HTMLResponse)
    async def playground(self, request: Request):
        return playground_html(f"SwD {self.cfg.name}", request.scope.get("root_path", ""))

    @api.get("/health")
    async def health(self):
        await self._model_info(fresh=True)  # a replica that answers, with a model loaded
        return {"status": "ok"}  # unauthenticated: liveness only, nothing about the model

    @api.get("/v1/models")
    async def models(self, request: Request):
        self.auth.check(request.headers.get("authorization"))
        return {"object": "list", "data": [await self._model_info(fresh=True)]}

    @api.post("/v1/images/generations")
    async def generations(self, request: Request):
        self.auth.check(request.headers.get("authorization"))
        body = await read_limited_body(request.headers, request.stream())
        req = parse_json_request(body, request.headers.get("content-type"), await self._limits())
        seeds, results = await self._generate(req)
        return JSONResponse(
            {"created": int(time.time()),
             "data": [{"b64_json": base64.b64encode(r["png"]).decode(), "seed": s} for s, r in zip(seeds, results)]},
            headers={**_model_headers(results[0]),
                     **({"X-SWD-Ignored": ", ".join(req.ignored)} if req.ignored else {})})

    @api.get("/generate")
    async def generate_png(self, request: Request, prompt: str | None = None, seed: str | None = None,
                           size: str | None = None):
        self.auth.check(request.headers.get("authorization"))
        req = parse_query_request(prompt, seed, size, await self._limits())
        seeds, results = await self._generate(req)
        r = results[0]
        return Response(r["png"], media_type="image/png",
                        headers={"X-SWD-Seed": str(seeds[0]), **_model_headers(r)})
