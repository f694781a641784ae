"""Serving pieces that need no Ray: request validation, API-key reading, the serve schema."""

from __future__ import annotations

import pytest

from pipelines.cluster import render
from pipelines.schema import PipelineConfigError, ServeConfig, load_pipeline_config, parse_pipeline_config
from pipelines.serve.auth import BearerAuth, read_api_key
from pipelines.serve.config import serve_config
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
    serve = cfg.serve.model_copy(update={"min_replicas": 1, "max_replicas": 3, "api_key_env": "SWD_API_KEY"})
    cfg = cfg.model_copy(update={"serve": serve})
    doc = serve_config(cfg)
    schema = ServeDeploySchema.model_validate(doc)
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


@pytest.mark.parametrize("args, words", [
    ([], "exactly one of them; got no args"),
    (["config=pipelines/configs/toy.yaml", "definition=x"], "exactly one of them; got ['config', 'definition']"),
    (["config=pipelines/configs/toy.yaml", "replicas=2"], "replicas\n  Extra inputs are not permitted"),
])
def test_serve_run_refuses_bad_app_args_before_it_deploys(args, words, monkeypatch):
    """`serve run`'s own path: Serve validates the args into app_builder's model, so a bad set of
    args is a validation error naming the problem, raised before Ray starts."""
    import sys

    import ray
    from click.testing import CliRunner
    from pydantic import ValidationError
    from ray.serve.scripts import cli

    def no_cluster(*args, **kwargs):
        raise AssertionError("serve run went on to start Ray with these args")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(sys, "path", list(sys.path))  # serve run puts its --app-dir first
    result = CliRunner().invoke(cli, ["run", "pipelines.serve.app:app_builder", *args])
    assert isinstance(result.exception, ValidationError), result.output
    assert "validation error for AppArgs" in str(result.exception) and words in str(result.exception)


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

    from pipelines.serve.app import model_user_config, replica_args
    from pipelines.serve.generator import Generator
    from pipelines.serve.stand_in import export_stand_in

    cfg = load_pipeline_config("pipelines/configs/toy.yaml")
    student = export_stand_in(cfg, tmp_path / "student")
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_validate(
        {"model": str(student), "max_batch_size": 4, "batch_wait_timeout_s": 0,
         "deterministic_batching": deterministic})})
    cls = Generator.func_or_class
    gen = cls(replica_args(cfg))
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


@pytest.mark.parametrize("body,field,words", [
    (b'{"prompt": "x\\ud800", "seed": 1}', "prompt", "not valid Unicode"),  # a lone surrogate, as JSON escapes it
    (b'{"prompt": "\xed\xa0\x80"}', "prompt", "not valid Unicode"),  # the same, as raw bytes
    (b'{"prompt": "x", "st\\udfffyle": 1}', "st\\udfffyle", "not valid Unicode"),  # in a field name
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "seed", "5000-digit integer is out of range"),
    (b'{"prompt": "x", "seed": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "seed", "nested more than"),
    (b"[" * 30_000 + b"]" * 30_000, "body", "nested more than"),
    (b'{"prompt": "x", "quality": ' + b"[" * 40 + b"]" * 40 + b"}", "quality", "nested more than 32"),
], ids=["surrogate-escape", "surrogate-bytes", "surrogate-key", "long-seed", "deep-seed", "deep-body", "deep-quality"])
def test_what_cannot_be_encoded_or_parsed_is_a_400_naming_the_field(body, field, words):
    import json as _json

    with pytest.raises(RequestError) as err:
        parse_json_request(body, "application/json", LIMITS)
    assert err.value.status == 400 and err.value.param == field and err.value.message.startswith(f"{field}: ")
    assert words in err.value.message
    _json.dumps(err.value.body(), ensure_ascii=False).encode()  # the answer itself encodes
    with pytest.raises(RequestError, match="seed: a 5000-digit integer is out of range"):
        parse_query_request("x", "9" * 5000, None, LIMITS)


def test_serve_listens_on_loopback_unless_a_key_or_a_host_is_set():
    toy = load_pipeline_config("pipelines/configs/toy.yaml")
    assert serve_config(toy)["http_options"]["host"] == "127.0.0.1" and toy.serve.exposure_warning() is None
    keyed = ServeConfig(api_key_file="/etc/swd/key")
    assert keyed.listen_host == "0.0.0.0" and keyed.exposure_warning() is None
    assert ServeConfig(host="::1").exposure_warning() is None
    assert ServeConfig(host="localhost").listen_host == "localhost"
    for public in ("0.0.0.0", "10.1.2.3", "serve.example.com"):
        assert "no API key" in ServeConfig(host=public).exposure_warning()
    # in a pod the proxy listens on the pod's address: its ClusterIP Service is the boundary
    (manifest,) = render(toy, "rayservice", {"image": "example/swd:1"})
    import yaml

    assert yaml.safe_load(manifest["spec"]["serveConfigV2"])["http_options"]["host"] == "0.0.0.0"


def test_replicas_get_and_are_versioned_by_only_what_they_run():
    from pipelines.retraining.cycle import served_model
    from pipelines.serve.app import code_version, replica_args

    base = load_pipeline_config("pipelines/configs/toy.yaml")
    data = base.model_dump(mode="json")
    same = [{**data, "data": {**data["data"], "sources": [{**data["data"]["sources"][0], "limit": 96}]}},
            {**data, "distill": {**data["distill"], "steps": 600, "lr": 3e-4}},
            {**data, "evaluate": {**data["evaluate"], "num_prompts": 64}},
            {**data, "serve": {**data["serve"], "replicas": 2, "port": 8001, "model": "s3://b/v2", "model_id": "v2"}}]
    version = code_version(replica_args(base))
    for d in same:
        assert code_version(replica_args(parse_pipeline_config(d))) == version
    version2 = code_version(replica_args(served_model(base, type("V", (), {"source": "/m/v2", "number": 2})())))
    assert version2 == version  # a promotion changes only user_config
    for d in ({**data, "serve": {**data["serve"], "max_batch_size": 4}},
              {**data, "teacher": {**data["teacher"], "dtype": "bfloat16"}}):
        assert code_version(replica_args(parse_pipeline_config(d))) != version


def test_a_request_the_model_fails_on_fails_alone_and_its_batch_is_answered_as_if_each_came_alone(tmp_path):
    """The generator's batch handler outside Serve (as above): a prompt the tokenizer refuses (a
    lone surrogate, which validation keeps from the HTTP API) in a batch of three."""
    import asyncio

    from pipelines.serve.app import model_user_config, replica_args
    from pipelines.serve.generator import Generator
    from pipelines.serve.stand_in import export_stand_in

    cfg = load_pipeline_config("pipelines/configs/toy.yaml")
    student = export_stand_in(cfg, tmp_path / "student")
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_validate({"model": str(student), "max_batch_size": 4})})
    cls = Generator.func_or_class
    gen = cls(replica_args(cfg))
    good = [("a red circle", 3), ("a blue square", 4)]

    async def batches():
        await gen.reconfigure(model_user_config(cfg))
        alone = [(await cls.generate.__wrapped__(gen, [r]))[0] for r in good]
        mixed = await cls.generate.__wrapped__(gen, [good[0], ("x\ud800", 5), good[1]])
        bad_alone = await cls.generate.__wrapped__(gen, [("x\ud800", 5)])
        return alone, mixed, bad_alone

    alone, mixed, bad_alone = asyncio.run(batches())
    assert len(mixed) == 3 and "png" not in mixed[1] and mixed[1]["error"].startswith("TypeError")
    assert [m["png"] for m in (mixed[0], mixed[2])] == [a["png"] for a in alone]  # byte for byte
    assert mixed[0]["batch"] == mixed[2]["batch"] == 1
    assert bad_alone[0]["error"] == mixed[1]["error"]
