"""Serving pieces that need no Ray: request validation, API-key reading, the serve schema."""

from __future__ import annotations

import pytest

from pipelines.schema import PipelineConfigError, ServeConfig, load_pipeline_config, parse_pipeline_config
from pipelines.cluster import render
from pipelines.serve.config import serve_config
from pipelines.serve.auth import BearerAuth, read_api_key
from pipelines.serve.validation import Limits, RequestError, parse_json_request, parse_query_request

LIMITS = Limits(max_images=4, max_prompt_chars=50, sizes=("64x64",))


def test_valid_request_defaults():
    req = parse_json_request(b'{"prompt": "  a red circle ", "seed": 3}', "application/json; charset=utf-8", LIMITS)
    assert (req.prompt, req.n, req.size, req.seed, req.response_format) == ("a red circle", 1, "64x64", 3, "b64_json")
    assert parse_query_request("x", " 42 ", None, LIMITS).seed == 42


def test_every_problem_is_reported_at_once():
    with pytest.raises(RequestError) as err:
        parse_json_request(b'{"prompt": "", "n": 9, "seed": true}', "application/json", LIMITS)
    msg = err.value.message
    assert err.value.status == 400 and "prompt is empty" in msg and "between 1 and 4" in msg and "seed" in msg


@pytest.mark.parametrize("seed", ["1e3", "0x10", "", "1.0"])
def test_query_seed_must_be_an_integer_literal(seed):
    with pytest.raises(RequestError, match="seed: must be an integer"):
        parse_query_request("x", seed, None, LIMITS)


def test_oversized_body_is_413():
    with pytest.raises(RequestError) as err:
        parse_json_request(b"{" + b" " * 70000 + b"}", "application/json", LIMITS)
    assert err.value.status == 413


def test_api_key_from_env_or_file(monkeypatch, tmp_path):
    assert read_api_key(ServeConfig()) is None
    monkeypatch.setenv("SWD_TEST_KEY", "k-env")
    assert read_api_key(ServeConfig(api_key_env="SWD_TEST_KEY")) == "k-env"
    (tmp_path / "key").write_text("k-file\n")
    assert read_api_key(ServeConfig(api_key_file=str(tmp_path / "key"))) == "k-file"
    monkeypatch.delenv("SWD_TEST_KEY")
    with pytest.raises(RuntimeError, match="SWD_TEST_KEY") as err:
        read_api_key(ServeConfig(api_key_env="SWD_TEST_KEY"))
    assert "k-env" not in str(err.value)
    auth = BearerAuth("secret")
    auth.check("Bearer secret")
    for bad in (None, "secret", "Bearer nope", "Basic secret"):
        with pytest.raises(RequestError) as e:
            auth.check(bad)
        assert e.value.status == 401 and "secret" not in e.value.message


def test_serve_section_is_checked():
    data = load_pipeline_config("pipelines/configs/toy.yaml").model_dump(mode="json")
    for bad, words in [({"max_batch_size": 8, "max_ongoing_requests": 4}, "batches can never fill"),
                       ({"min_replicas": 1}, "both min_replicas and max_replicas"),
                       ({"api_key_env": "A", "api_key_file": "f"}, "at most one"),
                       ({"route_prefix": "swd"}, "must start with '/'")]:
        with pytest.raises(PipelineConfigError, match=words):
            parse_pipeline_config({**data, "serve": {**data["serve"], **bad}})


def test_generated_serve_config_and_rayservice_validate():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = load_pipeline_config("pipelines/configs/toy.yaml")
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"min_replicas": 1, "max_replicas": 3, "api_key_env": "SWD_API_KEY"})})
    doc = serve_config(cfg)
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    (application,) = schema.applications
    assert application.import_path == "pipelines.serve.app:app_builder"
    gen = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "Generator")
    assert gen["autoscaling_config"]["max_replicas"] == 3 and gen["user_config"]["model"] == "runs/toy/student/merged"
    assert "num_replicas" not in gen
    (manifest,) = render(cfg, "rayservice", {"image": "example/swd:1"})
    assert manifest["kind"] == "RayService" and manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    inner = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert inner == yaml.safe_load(yaml.safe_dump(doc))
    env = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["name"] == "SWD_API_KEY" and "secretKeyRef" in env[0]["valueFrom"]


def test_a_rewritten_key_file_rotates_the_key_without_a_redeploy(tmp_path):
    import os

    key = tmp_path / "key"
    key.write_text("old-key\n")
    auth = BearerAuth.from_config(ServeConfig(api_key_file=str(key)))
    auth.check("Bearer old-key")
    key.write_text("new-key\n")
    st = key.stat()
    os.utime(key, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later write, whatever the clock's grain
    auth.check("Bearer new-key")
    with pytest.raises(RequestError) as err:
        auth.check("Bearer old-key")
    assert err.value.status == 401
    key.write_text("")  # mid-rotation: empty for a moment; the last key holds
    os.utime(key, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    auth.check("Bearer new-key")
    key.unlink()
    auth.check("Bearer new-key")


def test_an_oversized_body_is_refused_before_it_is_read():
    import asyncio

    from pipelines.serve.validation import MAX_BODY_BYTES, read_limited_body

    read = []

    async def stream(chunks):
        for c in chunks:
            read.append(len(c))
            yield c

    def run(headers, chunks):
        return asyncio.run(read_limited_body(headers, stream(chunks)))

    with pytest.raises(RequestError) as err:  # declared too large: not one byte read
        run({"content-length": str(10 * MAX_BODY_BYTES)}, [b"x" * 1024] * 640)
    assert err.value.status == 413 and read == []
    with pytest.raises(RequestError) as err:  # chunked, no length: stops at the first chunk past the limit
        run({}, [b"x" * 16384] * 100)
    assert err.value.status == 413 and len(read) == MAX_BODY_BYTES // 16384 + 1
    read.clear()
    assert run({"content-length": "2"}, [b"{}"]) == b"{}"
    with pytest.raises(RequestError, match="not a number"):
        run({"content-length": "lots"}, [b"{}"])


def test_openai_fields_are_applied_or_named_as_ignored():
    import json as _json

    body = {"prompt": "x", "n": 2, "model": "toy-swd", "user": "u1", "quality": "hd", "style": "vivid",
            "output_format": "png", "stream": False}
    req = parse_json_request(_json.dumps(body).encode(), "application/json", LIMITS)
    assert req.n == 2 and req.ignored == ["quality", "style", "stream"]
    req = parse_json_request(b'{"prompt": "x", "output_format": "webp"}', "application/json", LIMITS)
    assert req.ignored == ["output_format"]
    assert parse_json_request(b'{"prompt": "x"}', "application/json", LIMITS).ignored == []
    with pytest.raises(RequestError, match="qualty: unknown field"):  # a field the API does not define
        parse_json_request(b'{"prompt": "x", "qualty": "hd"}', "application/json", LIMITS)


@pytest.mark.parametrize("deterministic", [False, True], ids=["as-arrived", "deterministic"])
def test_a_batch_computes_only_its_own_images_unless_batching_is_deterministic(tmp_path, deterministic):
    """The generator deployment's own class and batch handler, outside Serve (the @serve.batch
    queue needs a replica; `__wrapped__` is the handler it calls with the gathered requests)."""
    import asyncio

    from pipelines.serve.app import definition_args, model_user_config
    from pipelines.serve.generator import Generator
    from pipelines.serve.stand_in import export_stand_in

    cfg = load_pipeline_config("pipelines/configs/toy.yaml")
    student = export_stand_in(cfg, tmp_path / "student")
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_validate(
        {"model": str(student), "max_batch_size": 4, "batch_wait_timeout_s": 0, "deterministic_batching": deterministic})})
    cls = Generator.func_or_class
    gen = cls(definition_args(cfg))
    rows = []

    async def batches():
        await gen.reconfigure(model_user_config(cfg))
        # every transformer call's batch dimension: the images actually computed
        gen.model.adapter.pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
        alone = await cls.generate.__wrapped__(gen, [("a red circle", 3)])
        seen_alone = list(rows)
        rows.clear()
        pair = await cls.generate.__wrapped__(gen, [("a red circle", 3), ("a blue square", 4)])
        return alone, seen_alone, pair

    alone, seen_alone, pair = asyncio.run(batches())
    assert len(alone) == 1 and alone[0]["batch"] == 1 and alone[0]["png"].startswith(b"\x89PNG")
    assert len(pair) == 2 and {p["batch"] for p in pair} == {2}
    assert seen_alone and set(seen_alone) == ({4} if deterministic else {1}), seen_alone
    assert rows and set(rows) == ({4} if deterministic else {2}), rows
