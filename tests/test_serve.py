"""The deploy stage's Ray Serve app on the shared local Ray cluster, over real HTTP on 127.0.0.1.

Students are the toy teacher exported in the student format (pipelines.serve.stand_in) — the
same export and loading path a distilled student takes — one of them perturbed for the hot swap.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pipelines.schema import load_pipeline_config
from pipelines.serve import app_builder, build_app
from pipelines.serve.app import AppArgs
from pipelines.serve.config import serve_config
from pipelines.serve.model import load_student, render_pngs
from pipelines.serve.stand_in import export_stand_in
from swd_core.generate import generate_images
from tests.conftest import free_port
from tests.http_load import Load

pytestmark = pytest.mark.ray

PROMPT = "a large red circle in the center on a white background"
APP, ROUTE = "swd-test-serve", "/swd-test"


def toy_cfg(**serve):
    cfg = load_pipeline_config("pipelines/configs/toy.yaml")
    base = {"app_name": APP, "route_prefix": ROUTE, "host": "127.0.0.1", "max_batch_size": 4,
            "max_ongoing_requests": 8, "batch_wait_timeout_s": 0.3, "cpus_per_replica": 1}
    return cfg.model_copy(update={"serve": cfg.serve.model_validate({**base, **serve})})


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    cfg = toy_cfg()
    return {"a": str(export_stand_in(cfg, root / "a")),
            "b": str(export_stand_in(cfg, root / "b", perturb=1.0, seed=1))}


@pytest.fixture(scope="module")
def http_base(ray_cluster):
    """Serve's HTTP proxy on 127.0.0.1, head node only (both test nodes share the address)."""
    from ray import serve

    from pipelines.ray_compat import serve_http_address

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()})
    _, port = serve_http_address()  # the port in effect, if Serve was already running
    return f"http://127.0.0.1:{port}"


def deploy(cfg, use_config_file: bool = False):
    from ray import serve

    # The generated Serve config's import path and args build the same app as the deploy stage;
    # Serve validates the args into the builder's annotated model (AppArgs) first, as here.
    if use_config_file:
        app = app_builder(AppArgs.model_validate(serve_config(cfg)["applications"][0]["args"]))
    else:
        app = build_app(cfg)
    serve.run(app, name=cfg.serve.app_name, route_prefix=cfg.serve.route_prefix, blocking=False)


@pytest.fixture(scope="module")
def app(http_base, students):
    from ray import serve

    # deterministic batching (opt-in): the tests below compare pixels across batch sizes exactly
    cfg = toy_cfg(model=students["a"], deterministic_batching=True)
    deploy(cfg, use_config_file=True)
    try:
        yield http_base + ROUTE, cfg
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def offline(students):
    """The students sampled in this process, as a user of swd_core would (1 thread, like a replica)."""
    cfg = toy_cfg()
    models = {k: load_student(cfg, path, k) for k, path in students.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield models
    torch.set_num_threads(threads)


def post(url, body, **kw):
    return requests.post(f"{url}/v1/images/generations", json=body, timeout=60, **kw)


def b64_pixels(item) -> np.ndarray:
    return pixels(base64.b64decode(item["b64_json"]))


def test_with_deterministic_batching_images_match_offline_sampler_and_do_not_depend_on_batching(app, offline):
    url, cfg = app
    seeds = [11, 12, 13, 14]
    # The four requests leave together (a barrier, not thread start-up order) so they fall in one
    # batching window even on a loaded machine; a window missed anyway is tried again.
    for _ in range(3):
        start = threading.Barrier(len(seeds))

        def together_with_the_others(seed):
            start.wait()
            return post(url, {"prompt": PROMPT, "seed": seed})

        with ThreadPoolExecutor(len(seeds)) as pool:
            together = list(pool.map(together_with_the_others, seeds))
        assert all(r.status_code == 200 for r in together), [r.text for r in together]
        if max(int(r.headers["x-swd-batch"]) for r in together) > 1:
            break
    else:
        raise AssertionError("concurrent requests were never batched (three tries)")
    alone = [post(url, {"prompt": PROMPT, "seed": s}) for s in seeds]
    assert all(int(r.headers["x-swd-batch"]) == 1 for r in alone)
    for s, t, a in zip(seeds, together, alone):
        body = t.json()
        assert set(body) == {"created", "data"} and body["data"][0]["seed"] == s
        got = b64_pixels(body["data"][0])
        assert got.shape == (64, 64, 3)
        np.testing.assert_array_equal(got, b64_pixels(a.json()["data"][0]))  # batched == alone, exactly
        # The offline sampler: exactly, at the replica's fixed batch shape ...
        expected = pixels(render_pngs(offline["a"], [PROMPT], [s], cfg.serve.max_batch_size)[0])
        np.testing.assert_array_equal(got, expected)
        # ... and within one grey level of a plain batch-of-one call (kernels differ by batch size).
        plain = np.asarray(generate_images(offline["a"].adapter, [PROMPT], [s], schedule=offline["a"].schedule)[0])
        assert np.abs(got.astype(int) - plain.astype(int)).max() <= 1
    # The PNG endpoint gives the same image for the same prompt and seed.
    r = requests.get(f"{url}/generate", params={"prompt": PROMPT, "seed": 12}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-swd-seed"] == "12"
    np.testing.assert_array_equal(pixels(r.content), b64_pixels(together[1].json()["data"][0]))
    # n images take consecutive seeds; no seed draws one and reports it.
    r = post(url, {"prompt": PROMPT, "n": 2, "seed": 13})
    assert [d["seed"] for d in r.json()["data"]] == [13, 14]
    np.testing.assert_array_equal(b64_pixels(r.json()["data"][1]), b64_pixels(together[3].json()["data"][0]))
    r = post(url, {"prompt": PROMPT})
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["seed"], int)


def test_models_and_health(app, students):
    url, _ = app
    models = requests.get(f"{url}/v1/models", timeout=30).json()
    (m,) = models["data"]
    assert m["id"] == "toy-swd" and m["source"] == students["a"] and m["teacher"] == "builtin:toy-sd3"
    assert m["schedule"]["scales"] == [8, 10, 12, 16] and m["sizes"] == ["64x64"]
    health = requests.get(f"{url}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # nothing about the model
    r = requests.get(f"{url}/generate", params={"prompt": PROMPT, "seed": 1}, timeout=60)
    assert r.headers["x-swd-model"] == "toy-swd" and "x-swd-source" not in r.headers
    # what OpenAI clients send besides: accepted, and what does not apply is named
    r = post(url, {"prompt": PROMPT, "seed": 1, "quality": "hd", "style": "natural", "user": "me"})
    assert r.status_code == 200 and r.headers["x-swd-ignored"] == "quality, style"


BAD = [
    # (description, request kwargs, status, words the message must contain)
    ("missing prompt", {"json": {"seed": 1}}, 400, "prompt: required"),
    ("empty prompt", {"json": {"prompt": "   "}}, 400, "prompt is empty"),
    ("over-long prompt", {"json": {"prompt": "a" * 1001}}, 400, "limit is 1000"),
    ("n too large", {"json": {"prompt": "x", "n": 5}}, 400, "between 1 and 4"),
    ("n zero", {"json": {"prompt": "x", "n": 0}}, 400, "between 1 and 4"),
    ("unsupported size", {"json": {"prompt": "x", "size": "1024x1024"}}, 400, "supported: 64x64"),
    ("non-integer seed", {"json": {"prompt": "x", "seed": 1.5}}, 400, "seed: must be an integer"),
    ("string seed", {"json": {"prompt": "x", "seed": "7"}}, 400, "seed: must be an integer"),
    ("negative seed", {"json": {"prompt": "x", "seed": -1}}, 400, "seed"),
    ("url response format", {"json": {"prompt": "x", "response_format": "url"}}, 400, "b64_json"),
    ("unknown field", {"json": {"prompts": "x"}}, 400, "prompts: unknown field"),
    ("unknown model", {"json": {"prompt": "x", "model": "dall-e-3"}}, 404, "available: toy-swd"),
    ("malformed JSON", {"data": b'{"prompt": "x",', "headers": {"Content-Type": "application/json"}},
     400, "malformed JSON"),
    ("JSON array", {"json": ["x"]}, 400, "must be an object"),
    ("wrong content type", {"data": b"prompt=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     415, "application/json"),
    ("no content type", {"data": b'{"prompt": "x"}'}, 415, "application/json"),
    ("oversized body", {"data": b"{" + b" " * 200_000 + b"}", "headers": {"Content-Type": "application/json"}},
     413, "(Content-Length); the limit is 65536"),
    ("oversized chunked body",
     {"data": iter([b"{" + b" " * 16_384] * 8), "headers": {"Content-Type": "application/json"}},
     413, "stopped reading there"),
    # what cannot be encoded or parsed: a 400 naming the field, never a 500 (nor a failed batch)
    ("lone surrogate", {"data": b'{"prompt": "x\\ud800", "seed": 1}', "headers": {"Content-Type": "application/json"}},
     400, "prompt: not valid Unicode"),
    ("5000-digit seed", {"data": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                         "headers": {"Content-Type": "application/json"}}, 400, "seed: a 5000-digit integer"),
    ("JSON 30000 deep", {"data": b'{"prompt": "x", "n": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
                         "headers": {"Content-Type": "application/json"}}, 400, "n: nested more than"),
]


@pytest.mark.parametrize("desc,kwargs,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_generation_requests_get_a_4xx_with_a_message(app, desc, kwargs, status, words):
    url, _ = app
    r = requests.post(f"{url}/v1/images/generations", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("params,words", [({"seed": "3"}, "prompt: required"),
                                          ({"prompt": "x", "seed": "abc"}, "integer"),
                                          ({"prompt": "x", "seed": "1.5"}, "integer"), ({"prompt": ""}, "empty"),
                                          ({"prompt": "x", "seed": "9" * 5000}, "seed: a 5000-digit integer"),
                                          ({"prompt": "x", "size": "8x8"}, "supported: 64x64")])
def test_bad_png_requests_get_a_4xx_with_a_message(app, params, words):
    url, _ = app
    r = requests.get(f"{url}/generate", params=params, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_replica_survives_bad_requests(app):
    url, _ = app
    assert requests.get(f"{url}/nope", timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/images/generations", timeout=30).status_code == 405
    assert post(url, {"prompt": PROMPT, "seed": 0}).status_code == 200


def test_no_generated_request_gets_a_5xx_or_a_traceback(app, request):
    """Property-based: requests Hypothesis makes up (near-valid and hostile bodies, content types,
    query strings, methods, paths) against the real app. None may get a 5xx or show a
    traceback; every 4xx has OpenAI's error shape; every 2xx is what its endpoint promises."""
    import json
    import string
    from collections import Counter
    from datetime import timedelta

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pipelines.serve.validation import ImageRequest
    url, _ = app
    # no lone surrogates: `requests` cannot send them
    text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
    # in a JSON body they are \u escapes: sendable, and refused with a 400
    json_text = text | st.tuples(text, st.characters(categories=["Cs"]), text).map("".join)
    scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | json_text
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                         max_leaves=6)
    # near-valid bodies: right field names, values valid or not (n up to 6 against a limit of 4)
    near = st.fixed_dictionaries(
        {"prompt": st.sampled_from([PROMPT, "a blue square", " ", ""]) | st.text(max_size=1100) | value},
        optional={"n": st.integers(-1, 6) | value, "seed": st.integers(-3, 2**64) | value,
                  "size": st.sampled_from(["64x64", "1024x1024", ""]) | value,
                  "response_format": st.sampled_from(["b64_json", "url"]) | value,
                  "model": st.sampled_from(["toy-swd", "dall-e-3"]) | value,
                  **{f: value for f in ImageRequest.model_fields if f not in ("prompt", "n", "seed", "size")}})
    anything = st.dictionaries(st.sampled_from([*ImageRequest.model_fields, "prompts"]) | text, value, max_size=5)
    json_body = (near | anything | value).map(lambda v: json.dumps(v).encode())
    body = json_body | st.binary(max_size=200) | json_body.map(lambda b: b[: len(b) // 2])
    # printable ASCII without edge spaces: what `requests` agrees to send as a header value
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip)
    content_type = st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
                                    "text/plain", "multipart/form-data"]) | header_text | st.none()
    post = st.tuples(st.just("POST"), st.just("/v1/images/generations"), st.none(), body, content_type)
    query = st.dictionaries(st.sampled_from(["prompt", "seed", "size", "n"]) | text,
                            st.sampled_from([PROMPT, "12", "-1", "1.5", "64x64"]) | text, max_size=4)
    get = st.tuples(st.just("GET"), st.just("/generate"), query, st.none(), st.none())
    paths = st.sampled_from(["/v1/images/generations", "/generate", "/v1/models", "/health", "/", "/nope", "/v1"]) | \
        st.text(string.ascii_letters + string.digits + "-_/%~", max_size=20).map(lambda p: "/" + p)
    other = st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]), paths, query,
                      st.none() | body, content_type)
    codes: Counter = Counter()

    @settings(max_examples=100, deadline=timedelta(seconds=60), database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(post | get | other)
    def one(request):
        method, path, params, data, ctype = request
        headers = {} if ctype is None else {"Content-Type": ctype}
        r = requests.request(method, url + path, params=params, data=data, headers=headers, timeout=60)
        codes[r.status_code] += 1
        where = (f"{method} {path} params={params!r} body={data!r:.200} content-type={ctype!r}: "
                 f"{r.status_code} {r.text[:300]!r}")
        assert r.status_code < 500, where
        assert "Traceback" not in r.text, where
        if 400 <= r.status_code < 500 and method != "HEAD":
            error = r.json().get("error")
            assert isinstance(error, dict), where
            assert isinstance(error.get("message"), str) and error["message"], where
            assert isinstance(error.get("type"), str) and error["type"], where
        elif r.status_code == 200 and method == "POST" and path == "/v1/images/generations":
            assert all(base64.b64decode(d["b64_json"]).startswith(b"\x89PNG") for d in r.json()["data"]), where
        elif r.status_code == 200 and method == "GET" and path == "/generate":
            assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG"), where

    try:
        one()
    finally:
        statuses = ", ".join(f"{c}: {n}" for c, n in sorted(codes.items()))
        request.node.user_properties.append(
            ("summary", f"HTTP property test: {sum(codes.values())} requests sent; status codes {statuses}"))
    assert codes[200] > 0 and sum(n for c, n in codes.items() if 400 <= c < 500) > 0, codes  # both kinds were tried


def test_auth_and_backpressure(http_base, students, tmp_path):
    """A second app: API key required, capacity of one request in flight plus one queued."""
    from ray import serve

    key = "sk-test-" + "x" * 24
    (tmp_path / "key").write_text(key + "\n")
    cfg = toy_cfg(model=students["a"], app_name=APP + "-auth", route_prefix=ROUTE + "-auth",
                  api_key_file=str(tmp_path / "key"), max_batch_size=1, max_ongoing_requests=1,
                  max_queued_requests=1, batch_wait_timeout_s=0)
    from pipelines.stages import deploy as deploy_stage

    out = deploy_stage.run(cfg)  # the pipeline's deploy stage, on the running cluster
    url = http_base + ROUTE + "-auth"
    assert out["url"] == url + "/" and out["model"]["model"] == students["a"]
    ok = {"Authorization": f"Bearer {key}"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            r = post(url, {"prompt": PROMPT}, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"] and key not in r.text
            assert requests.get(f"{url}/v1/models", headers=headers, timeout=30).status_code == 401
            r = requests.get(f"{url}/generate", params={"prompt": "x"}, headers=headers, timeout=30)
            assert r.status_code == 401
        r = post(url, {"prompt": PROMPT, "seed": 1}, headers=ok)
        assert r.status_code == 200 and key not in r.text
        assert requests.get(f"{url}/v1/models", headers=ok, timeout=30).status_code == 200
        # Health and the playground page need no key (probes, browsers); the page asks for it.
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        page = requests.get(f"{url}/", timeout=30)
        assert page.status_code == 200 and 'id="key"' in page.text and key not in page.text

        # Over capacity: 12 at once against room for 2 -> quick 503s, the rest served, nothing else.
        def one(s):
            start = time.perf_counter()
            r = post(url, {"prompt": PROMPT, "seed": s}, headers=ok)
            return r.status_code, time.perf_counter() - start, r

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        codes = sorted(c for c, _, _ in results)
        assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 2, codes
        refused = [r for c, _, r in results if c == 503]
        assert all("capacity" in r.json()["error"]["message"] or "retry" in r.json()["error"]["message"].lower()
                   for r in refused)
        assert post(url, {"prompt": PROMPT, "seed": 2}, headers=ok).status_code == 200  # still alive
        # The key is in no log of the cluster (replica, proxy, controller, access logs).
        from pipelines.ray_compat import session_logs_dir

        logs = Path(session_logs_dir())
        leaked = [f for f in logs.rglob("*") if f.is_file() and key.encode() in f.read_bytes()]
        assert not leaked, leaked
    finally:
        serve.delete(cfg.serve.app_name)


def test_hot_swap_under_load_has_no_failures(app, students, offline):
    from ray import serve

    url, cfg = app
    before = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["source"]
    assert before == students["a"]
    send = lambda: requests.get(f"{url}/generate", params={"prompt": PROMPT, "seed": 5}, timeout=60)  # noqa: E731
    with Load(send, threads=4) as load:
        load.wait_for(4)  # the load is on the first model
        serve_b = cfg.serve.model_copy(update={"model": students["b"], "model_id": "toy-swd-b"})
        swapped = cfg.model_copy(update={"serve": serve_b})
        serve.run(build_app(swapped), name=APP, route_prefix=ROUTE, blocking=False)
        deadline = time.time() + 60
        while requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["source"] != students["b"]:
            assert time.time() < deadline, "the swap never landed"
            time.sleep(0.2)
        after = load.wait_for(4, sent_after=time.monotonic())  # load continues on the new model
    assert not load.failures(), [(o.status, o.error, o.body) for o in load.failures()[:3]]
    assert [o.model for o in after] == ["toy-swd-b"] * len(after)
    assert {o.model for o in load.outcomes} == {"toy-swd", "toy-swd-b"}
    # Outputs switch with the model: the new source gives the new student's pixels.
    exp = {k: pixels(render_pngs(offline[k], [PROMPT], [5], cfg.serve.max_batch_size)[0]) for k in "ab"}
    assert not np.array_equal(exp["a"], exp["b"])
    for o in load.outcomes:
        np.testing.assert_array_equal(pixels(o.body), exp["a" if o.model == "toy-swd" else "b"])


def chromium_binary() -> str:
    """Debian's chromium: `make test` (and so CI) installs it before the suite runs."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: `make browser` installs it (`make test` does first)"
    return found


def test_playground_shows_a_generated_image_in_headless_chromium(app, tmp_path):
    url, _ = app
    chromium = chromium_binary()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--dump-dom",
           f"{url}/?prompt={PROMPT.replace(' ', '+')}&seed=21"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-state="done"' in dom, dom[-2000:]
    src = dom.split('id="result"', 1)[1].split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    shown = pixels(base64.b64decode(src))
    direct = requests.get(f"{url}/generate", params={"prompt": PROMPT, "seed": 21}, timeout=60)
    np.testing.assert_array_equal(shown, pixels(direct.content))


def test_a_driver_that_joined_the_cluster_did_not_start_ray(ray_cluster):
    from pipelines.ray_compat import started_ray_here

    assert started_ray_here() is False  # this session joined the test cluster; its head is another process


def test_deploy_that_started_ray_serves_on_loopback_in_the_foreground_until_sigterm(students, tmp_path):
    """SIGTERM (how Kubernetes stops a pod) is handled as Ctrl-C is: one line, Serve shut down,
    exit 143; no C-level stack dump from Ray's failure handler and no SIGABRT. No host and no
    key in the definition: the proxy listens on 127.0.0.1 only."""
    import os
    import signal
    import sys

    import psutil
    import yaml

    port = free_port()
    d = yaml.safe_load(Path("pipelines/configs/toy.yaml").read_text())
    d["serve"].update(model=students["a"], port=port, cpus_per_replica=1)
    d["resources"]["storage"] = str(tmp_path)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(d))
    # RAY_ADDRESS=local: start a Ray of its own instead of joining this machine's test cluster
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "pipelines/distill.py", "--config", str(path), "--stages", "deploy"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "serving until interrupted" in line:
                break
        r = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        assert r.status_code == 200 and r.json()["data"][0]["source"] == students["a"]
        assert proc.poll() is None, "".join(lines)  # the stage is in its foreground wait, and the app answers
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                     and c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, listening
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 143, out[-3000:]
    assert rest.count("stopping") == 1 and "[pipeline] SIGTERM received: stopping" in rest, out[-3000:]
    assert "SIGTERM received at time" not in rest and "Traceback" not in rest, rest[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
