"""Rendered cluster manifests (pipelines/cluster/) against the real schemas.

KubeRay objects are checked against the v1 CRD schemas of KubeRay v1.7.0 (cluster/crds/) made
strict as `kubectl apply --validate=strict` is: a field the schema does not list is an error
(pipelines/cluster/crd.py, which `render` uses too). The launcher file is checked against the
schema inside the installed `ray` package, core Kubernetes objects with kubernetes-validate. No
cluster, no Ray: all offline.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelines import cluster
from pipelines.cluster import Unit, render, size_groups
from pipelines.cluster.cli import main as cluster_main
from pipelines.cluster.crd import crd_errors, crd_schema, strict
from pipelines.cluster.shapes import DEFAULT_MEMORY
from pipelines.ray_runtime import JOB_ENV_VARS
from pipelines.schema import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))
KUBERAY_KINDS = {"rayjob": "RayJob", "raycluster": "RayCluster", "rayservice": "RayService"}
KUBERNETES_VERSION = "1.33"
PRIVATE_PORTS = {8265, 10001}  # the dashboard / job API and the Ray client
IMAGE = {"image": "registry.example/swd-ray:1"}


@lru_cache(maxsize=None)
def launcher_schema() -> dict:
    # find_spec locates the installed package without importing Ray
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def launcher_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(launcher_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@lru_cache(maxsize=None)
def definition(path: Path):
    return load_pipeline_config(path)


def by_stem(stem: str):
    return definition(ROOT / "pipelines" / "configs" / f"{stem}.yaml")


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")],
            "RayService": [spec.get("rayClusterConfig")]}[doc["kind"]]


def pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def exposed_ports(doc: dict) -> set[int]:
    """Ports a rendered KubeRay object makes reachable from outside the Kubernetes cluster."""
    ports = set()
    for spec in cluster_specs(doc):
        head = spec["headGroupSpec"]
        head_ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
        service = head.get("headService", {}).get("spec", {})
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or service.get("type", "ClusterIP") != "ClusterIP":
            ports |= head_ports | {8265, 10001, 6379}  # KubeRay adds its default ports to the head Service
        if head.get("enableIngress"):
            ports.add(8265)  # KubeRay's head Ingress routes to the dashboard
        for pod in pod_specs(spec):
            if pod.get("hostNetwork"):
                ports |= head_ports | PRIVATE_PORTS
            ports |= {p["hostPort"] for c in pod["containers"] for p in c.get("ports", []) if "hostPort" in p}
    serve = doc["spec"].get("serveService", {}).get("spec")
    if serve and serve.get("type", "ClusterIP") != "ClusterIP":
        ports |= {p["port"] for p in serve["ports"]} | {p.get("targetPort") for p in serve["ports"]} - {None}
    return ports


def cases():
    for path in CONFIGS:
        for kind in KUBERAY_KINDS:
            yield pytest.param(path, kind, id=f"{path.stem}-{kind}")


# --- the validator itself --------------------------------------------------------------------


def _toy_raycluster() -> dict:
    return render(by_stem("toy"), "raycluster", IMAGE)[0]


def test_strict_validator_rejects_what_kubectl_strict_would():
    doc = _toy_raycluster()
    assert crd_errors(doc) == []
    broken = copy.deepcopy(doc)
    broken["spec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"  # misspelt field
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    errors = crd_errors(broken)
    assert any("serviceTyp" in e for e in errors) and any("imagePolicy" in e for e in errors), errors
    # the CRD alone lets both through: the strictness is what rejects them
    assert crd_errors(broken, strict_fields=False) == []

    for mutate, words in [
        (lambda d: d["spec"]["authOptions"].update(mode="tokens"), "is not one of"),
        (lambda d: d["spec"]["headGroupSpec"].pop("template"), "'template' is a required property"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="2"), "is not of type 'integer'"),
        (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "was expected"),
        (lambda d: d["metadata"].update(name="Swd_Toy"), "does not match"),
    ]:
        bad = copy.deepcopy(doc)
        mutate(bad)
        assert any(words in e for e in crd_errors(bad)), (words, crd_errors(bad))


def test_strict_keeps_open_what_the_schema_leaves_open():
    schema = strict({"type": "object", "properties": {
        "a": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"x": {}}},
        "m": {"type": "object", "additionalProperties": {"type": "object", "properties": {"y": {}}}},
    }})
    assert schema["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]
    assert schema["properties"]["m"]["additionalProperties"]["additionalProperties"] is False
    jsonschema.validate({"a": {"anything": 1}, "m": {"k": {"y": 1}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"m": {"k": {"z": 1}}}, schema)


# --- every definition, every kind ----------------------------------------------------------------


@pytest.mark.parametrize("path,kind", list(cases()))
def test_rendered_kuberay_objects_validate(path, kind):
    docs = render(definition(path), kind, IMAGE)
    assert docs[0]["apiVersion"] == "ray.io/v1" and docs[0]["kind"] == KUBERAY_KINDS[kind]
    assert crd_errors(docs[0]) == []
    for companion in docs[1:]:
        kubernetes_validate.validate(companion, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_rendered_launcher_validates(path):
    (doc,) = render(definition(path), "launcher", IMAGE)
    assert launcher_errors(doc) == []
    broken = {**doc, "head_node_typ": "head"}
    assert any("head_node_typ" in e for e in launcher_errors(broken))
    fractional_head = {"node_config": {}, "resources": {"CPU": 0.5}}
    assert any("is not of type 'integer'" in e for e in launcher_errors(
        {**doc, "available_node_types": {**doc["available_node_types"], "head": fractional_head}}))


def test_options_render_valid_objects():
    """A service account instead of a storage Secret, a namespace, an API key and a LoadBalancer."""
    cfg = by_stem("sd35_medium_4step")
    serve = cfg.serve.model_copy(update={"api_key_env": "SWD_API_KEY", "min_replicas": 1, "max_replicas": 4,
                                         "gpus_per_replica": 1})
    keyed = cfg.model_copy(update={"serve": serve})
    opts = {**IMAGE, "namespace": "ml", "service_account": "swd-s3", "serve_service_type": "LoadBalancer",
            "auth_secret": "tok"}
    for kind in KUBERAY_KINDS:
        docs = render(keyed, kind, opts)
        assert crd_errors(docs[0]) == []
        assert all(d["metadata"]["namespace"] == "ml" for d in docs)
        for pod in (p for s in cluster_specs(docs[0]) for p in pod_specs(s)):
            assert pod["serviceAccountName"] == "swd-s3"
            assert all("envFrom" not in c for c in pod["containers"])  # the account, not a Secret
    service = render(keyed, "rayservice", opts)[0]
    assert exposed_ports(service) == {keyed.serve.port}
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 4)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


# --- security: token auth, nothing private leaves the cluster, no inline credentials ----------


@pytest.mark.parametrize("path,kind", list(cases()))
def test_token_auth_on_and_dashboard_and_client_stay_inside(path, kind):
    docs = render(definition(path), kind, IMAGE)
    for spec in cluster_specs(docs[0]):
        assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52)  # KubeRay refuses token auth below
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not exposed_ports(docs[0]) & PRIVATE_PORTS
    assert exposed_ports(docs[0]) == set()  # a definition without an API key exposes nothing
    for d in docs:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_exposure_check_can_fail():
    doc = _toy_raycluster()
    for mutate in [lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
                   lambda d: d["spec"]["headGroupSpec"].update(enableIngress=True),
                   lambda d: (d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][1]
                              .update(hostPort=8265))]:
        bad = copy.deepcopy(doc)
        mutate(bad)
        assert 8265 in exposed_ports(bad)


def test_serve_port_leaves_the_cluster_only_behind_an_api_key():
    cfg = by_stem("toy")
    with pytest.raises(ValueError, match="serve.api_key_env"):
        render(cfg, "rayservice", {**IMAGE, "serve_service_type": "LoadBalancer"})
    keyed = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_key_env": "SWD_API_KEY"})})
    (doc,) = render(keyed, "rayservice", {**IMAGE, "serve_service_type": "NodePort"})
    assert exposed_ports(doc) == {8000}
    env = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "SWD_API_KEY", "valueFrom": {"secretKeyRef": {"name": "swd-toy-api-key", "key": "key"}}} in env


@pytest.mark.parametrize("path,kind", list(cases()))
def test_credentials_by_reference_only(path, kind):
    cfg = definition(path)
    docs = render(cfg, kind, IMAGE)
    for spec in cluster_specs(docs[0]):
        for pod in pod_specs(spec):
            for c in pod["containers"]:
                # plain values only for what is no secret: where the model cache is, and offline mode
                assert all("valueFrom" in e or e["name"] in ("HF_HOME", "HF_HUB_OFFLINE")
                           for e in c.get("env", [])), c["env"]
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
                uses_s3 = "s3://" in json.dumps(cfg.model_dump(mode="json"))
                assert refs == ([f"{cluster.resource_name(cfg)}-storage"] if uses_s3 else [])
    text = yaml.safe_dump_all(docs)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "auth_token:" not in text


def test_launcher_keeps_the_dashboard_local_and_turns_on_tokens():
    for path in CONFIGS:
        (doc,) = render(definition(path), "launcher", IMAGE)
        starts = doc["head_start_ray_commands"][1:] + doc["worker_start_ray_commands"][1:]
        assert all("RAY_AUTH_MODE=token" in c for c in starts)
        assert "--dashboard-host=127.0.0.1" in doc["head_start_ray_commands"][1]
        assert doc["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
        assert doc["available_node_types"]["head"]["resources"] == {"CPU": 0}


# --- sizing from the definition ----------------------------------------------------------------


def _groups(doc):
    return {g["groupName"]: g for g in cluster_specs(doc)[0]["workerGroupSpecs"]}


def _limits(group):
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_pipeline_groups_follow_the_definition():
    medium = _groups(render(by_stem("sd35_medium_4step"), "rayjob", IMAGE)[0])
    # 16 Ray Train workers (the most GPU units of any stage), each pod as large as the largest
    # unit: 8 CPUs (a worker), 48Gi (a worker or the evaluate task); the run holds all 16; every
    # stage reserves a GPU, so the CPU group is only room for Ray Data's tasks
    assert (medium["gpu"]["minReplicas"], medium["gpu"]["maxReplicas"], _limits(medium["gpu"])) == (
        16, 16, {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "1"})
    assert (medium["cpu"]["replicas"], medium["cpu"]["maxReplicas"], _limits(medium["cpu"])["cpu"]) == (0, 4, "1")
    head = render(by_stem("sd35_medium_4step"), "rayjob", IMAGE)[0]["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    toy = _groups(render(by_stem("toy"), "raycluster", IMAGE)[0])
    # the evaluate task's 2 CPUs size the pod; the 2 precompute actors of 1 CPU share one
    assert set(toy) == {"cpu"} and (toy["cpu"]["replicas"], _limits(toy["cpu"])["cpu"]) == (1, "2")
    # memory per pod from the definition where it says it
    cfg = by_stem("sd35_medium_4step")
    sized = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"memory_per_worker": "96Gi"})})
    assert _limits(_groups(render(sized, "raycluster", IMAGE)[0])["gpu"])["memory"] == "96Gi"


def test_fractional_gpus_share_pods():
    gpu, cpu = size_groups([Unit("precompute", 4, 2, 0.5, "10Gi"), Unit("distill", 3, 4, 1, "30Gi"),
                            Unit("synthesize", 5, 1.5, 0)])
    assert (gpu.gpus, gpu.replicas, gpu.cpus, gpu.memory) == (1, 3, 4, "30Gi")  # 2 precompute actors per GPU
    assert (cpu.cpus, cpu.replicas, cpu.memory) == (2, 5, DEFAULT_MEMORY)
    (cpu_only,) = size_groups([Unit("distill", 2, 0.5, 0)])
    assert (cpu_only.cpus, cpu_only.replicas) == (1, 1)  # two half-CPU workers share a pod


def test_rayjob_spec_is_reusable_as_a_job_template():
    """A RayCronJob's jobTemplate is a RayJobSpec: the builder returns one that validates alone."""
    cfg = cluster.with_cluster(definition(CONFIGS[0]), IMAGE)
    spec = cluster.rayjob_spec(cfg)
    rayjob_spec_schema = crd_schema("RayJob")["properties"]["spec"]
    assert list(jsonschema.Draft7Validator(rayjob_spec_schema).iter_errors(spec)) == []
    assert spec["entrypoint"].endswith("--config /etc/swd/definition.yaml")
    (cm,) = render(cfg, "rayjob")[1:]
    assert load_pipeline_config_text(cm["data"]["definition.yaml"]) == cluster.job_definition(cfg)


def load_pipeline_config_text(text: str):
    from pipelines.schema import parse_pipeline_config

    return parse_pipeline_config(yaml.safe_load(text))


# --- the command line and what the repository keeps ------------------------------------------------


def test_cli_prints_the_ray_object_first(capsys):
    assert cluster_main(["render", "--config", str(CONFIGS[0]), "--kind", "rayjob", "--storage", "s3://b/runs",
                         "--image", IMAGE["image"]]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["RayJob", "ConfigMap"]
    assert "s3://b/runs" in docs[1]["data"]["definition.yaml"]


def test_cli_refuses_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cluster_main(["render", "--config", str(CONFIGS[0]), "--kind", "deployment"])
    assert cluster_main(["render", "--config", str(tmp_path / "missing.yaml"), "--kind", "rayjob"]) == 2
    assert "no such pipeline definition" in capsys.readouterr().err


def test_runtime_env_file_matches_the_renderer():
    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert runtime_env["env_vars"] == JOB_ENV_VARS
    for path in (ROOT / "cluster").glob("*.yaml"):
        for word in path.read_text().split():
            if word.strip("`'\"(),").startswith("cluster/") and word.strip("`'\"(),").endswith(".yaml"):
                assert (ROOT / word.strip("`'\"(),")).exists(), f"{path.name} names {word}"


# --- scheduled retraining ------------------------------------------------------------------------

RETRAIN = ROOT / "pipelines" / "configs" / "toy_retrain.yaml"


def test_retraining_manifests_validate_and_target_the_standing_cluster():
    cfg = definition(RETRAIN)
    opts = {**IMAGE, "namespace": "ml"}
    cluster_doc, configmap = render(cfg, "raycluster", opts)
    assert crd_errors(cluster_doc) == []
    kubernetes_validate.validate(configmap, KUBERNETES_VERSION, strict=True)
    name = cluster_doc["metadata"]["name"]
    # cycles and the Serve app share it: generator pods beside the pipeline's groups, and the
    # head mounts the definition the cycles read
    assert "generator" in {g["groupName"] for g in cluster_doc["spec"]["workerGroupSpecs"]}
    head = cluster_doc["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/swd"
    assert yaml.safe_load(configmap["data"]["definition.yaml"])["retrain"]["schedule"] == "0 3 * * *"

    (cron,) = render(cfg, "raycronjob", opts)
    assert cron["kind"] == "RayCronJob" and crd_errors(cron) == []
    assert cron["spec"]["schedule"] == "0 3 * * *" and cron["spec"]["timeZone"] == "Europe/Berlin"
    job = cron["spec"]["jobTemplate"]
    assert job["clusterSelector"] == {"ray.io/cluster": name}
    assert job["entrypoint"] == "python -m pipelines.retrain --once --config /etc/swd/definition.yaml"
    broken = {**cron, "spec": {**cron["spec"], "schedul": "0 3 * * *"}}
    assert crd_errors(broken)  # the strict check sees a misspelt field

    (cronjob,) = render(cfg, "cronjob", opts)
    kubernetes_validate.validate(cronjob, KUBERNETES_VERSION, strict=True)
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Europe/Berlin"
    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:5] == ["ray", "job", "submit", "--address", f"http://{name}-head-svc:8265"]
    assert container["command"][-6:] == job["entrypoint"].split()
    token = next(e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": f"{name}-ray-token", "key": "auth_token"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cronjob, "spec": {**spec, "concurrency": "Forbid"}},
                                     KUBERNETES_VERSION, strict=True)


def test_retraining_kinds_need_a_retrain_section():
    for kind in ("raycronjob", "cronjob"):
        with pytest.raises(ValueError, match="no `retrain` section"):
            render(by_stem("toy"), kind, IMAGE)
