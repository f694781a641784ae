"""The definition's `cluster` section, rendered into every kind: image and pull secrets, the
Hugging Face token and model cache on every pod, GPU node targeting and extra resources, GPUs
per pod, deadlines; the RayJob without deploy and preview; render's flags derived from the
schema. Every rendered KubeRay object is also checked against the strict CRD schema."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from pipelines.cluster import kind_definition, render, with_cluster
from pipelines.cluster.cli import cluster_flags
from pipelines.cluster.cli import main as cluster_main
from pipelines.cluster.crd import crd_errors
from pipelines.schema import ClusterConfig, PipelineConfigError, load_pipeline_config
from tests.test_cluster_manifests import CONFIGS, KUBERNETES_VERSION, ROOT, by_stem, cluster_specs

GPU_DEFINITIONS = ["sd35_medium_4step", "sd35_medium_6step", "sd35_large_4step", "flux1_dev_4step"]
IMAGE = "registry.example/swd-ray:2.60.0"
FULL = {
    "image": IMAGE, "image_pull_secrets": ["regcred"], "namespace": "ml", "hf_token_secret": "hf-token",
    "model_cache": {"claim": "hf-cache", "path": "/cache/hf"},
    "gpu": {"memory": "141G", "per_pod": 8, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["100000"]}]}]}}},
            "extra_resources": {"vpc.amazonaws.com/efa": 32}},
    "active_deadline_seconds": 86400, "start_deadline_seconds": 1800,
}


def pods(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of every Ray pod of a KubeRay object; the head is "head"."""
    out = []
    for spec in cluster_specs(doc):
        out.append(("head", spec["headGroupSpec"]["template"]["spec"]))
        out += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["containers"][0].get("env", [])}


@pytest.mark.parametrize("stem", GPU_DEFINITIONS)
@pytest.mark.parametrize("kind", ["rayjob", "raycluster", "rayservice"])
def test_shipped_gpu_definitions_reach_their_weights_and_their_gpus(stem, kind):
    """The token from a Secret and the shared cache on the head and every worker; the GPU pods,
    and only they, on the GPU nodes the definition names."""
    cfg = by_stem(stem)
    assert cfg.cluster.hf_token_secret and cfg.cluster.gpu.memory and cfg.cluster.gpu.node_selector
    doc = render(cfg, kind, {"image": IMAGE})[0]
    assert crd_errors(doc) == []
    for group, pod in pods(doc):
        env = env_of(pod)
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": cfg.cluster.hf_token_secret, "key": "HF_TOKEN"}}, group
        assert env["HF_HOME"] == cfg.cluster.model_cache.path and env["HF_HUB_OFFLINE"] == "1"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache", "readOnly": True}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[cfg.cluster.model_cache.path]["readOnly"] and "/dev/shm" in mounts
        gpus = pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert (pod.get("nodeSelector") == cfg.cluster.gpu.node_selector) == bool(gpus), group
        assert ("tolerations" in pod) == bool(gpus), group


@pytest.mark.parametrize("kind", ["rayjob", "raycluster", "rayservice", "launcher", "cronjob", "cache"])
def test_a_kind_is_not_rendered_without_an_image_that_holds_the_project(kind, capsys):
    cfg = by_stem("toy_retrain")
    with pytest.raises(ValueError, match=r"^cluster.image: --kind .* needs an image with this project"):
        render(cfg, kind, {"model_cache": {"claim": "c"}})
    assert cluster_main(["render", "--config", str(ROOT / "pipelines/configs/toy_retrain.yaml"), "--kind", kind]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cluster.image:")
    for stock in ("rayproject/ray:2.60.0-py311-gpu", "docker.io/rayproject/ray-ml:2.9.0", "rayproject/ray@sha256:ab"):
        with pytest.raises(PipelineConfigError, match="cluster.image: .*stock Ray image does not hold this project"):
            load_pipeline_config(ROOT / "pipelines/configs/toy.yaml", [f"cluster.image={stock}"])
    assert with_cluster(cfg, {"image": "registry.example/rayproject-ray:1"}).cluster.image  # a look-alike is fine


def test_every_option_of_the_section_reaches_every_pod():
    cfg = with_cluster(by_stem("sd35_large_4step"), FULL)
    job, configmap = render(cfg, "rayjob")
    assert crd_errors(job) == []
    kubernetes_validate.validate(configmap, KUBERNETES_VERSION, strict=True)
    spec = job["spec"]
    assert (spec["activeDeadlineSeconds"], spec["preRunningDeadlineSeconds"]) == (86400, 1800)
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]
    # 16 workers of 1 GPU, 8 CPUs and 64Gi each, 8 to a pod: 2 pods, held for the run
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (2, 2, 2)
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32"}
    assert gpu["template"]["spec"]["affinity"] == FULL["gpu"]["affinity"]
    for group, pod in pods(job):
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["containers"][0]["image"] == IMAGE
        assert env_of(pod)["HF_HOME"] == "/cache/hf"
        if group != "gpu":
            assert not {"nodeSelector", "tolerations", "affinity"} & set(pod)
            assert "vpc.amazonaws.com/efa" not in pod["containers"][0]["resources"]["limits"]
    assert job["metadata"]["namespace"] == configmap["metadata"]["namespace"] == "ml"


def test_a_writable_volume_cache_and_the_staging_job():
    cfg = with_cluster(by_stem("flux1_dev_4step"), {
        "image": IMAGE, "model_cache": {"volume": {"nfs": {"server": "fs.example.com", "path": "/hf"}},
                                        "read_only": False}})
    doc = render(cfg, "raycluster")[0]
    assert crd_errors(doc) == []
    for _, pod in pods(doc):
        assert {"name": "hf-cache", "nfs": {"server": "fs.example.com", "path": "/hf"}} in pod["volumes"]
        assert "HF_HUB_OFFLINE" not in env_of(pod)  # pods may download into a writable cache
    (job,) = render(cfg, "cache")
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["--teacher", "black-forest-labs/FLUX.1-dev"]
    assert container["volumeMounts"] == [{"name": "hf-cache", "mountPath": "/mnt/hf-cache", "readOnly": False}]
    assert {"name": "HF_HOME", "value": "/mnt/hf-cache"} in container["env"]
    assert not any(e["name"] == "HF_HUB_OFFLINE" for e in container["env"])  # the one pod that downloads
    with pytest.raises(ValueError, match="no cluster.model_cache"):
        render(with_cluster(cfg, {"model_cache": None}), "cache")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_rayjob_never_deploys_and_is_sized_without_serving(path, capsys):
    cfg = load_pipeline_config(path)
    job, configmap = render(cfg, "rayjob", {"image": IMAGE})
    stages = yaml.safe_load(configmap["data"]["definition.yaml"])["stages"]
    assert not {"deploy", "preview"} & set(stages)
    assert stages == [s for s in cfg.stages if s not in ("deploy", "preview")]
    assert cluster_main(["render", "--config", str(path), "--kind", "rayjob", "--image", IMAGE]) == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "left out" in line]
    assert bool(said) == bool({"deploy", "preview"} & set(cfg.stages))
    assert all("--kind rayservice" in line for line in said)


def test_rayjob_pods_count_only_the_stages_it_runs():
    # serving wants 6 GPU pods, distill 2: a RayJob (no deploy) holds 2, a RayCluster (deploy runs there) 6
    cfg = load_pipeline_config(ROOT / "pipelines/configs/toy.yaml", [
        "stages=[precompute, distill, evaluate, deploy, preview]", "resources.gpus_per_worker=1", "serve.replicas=6",
        "serve.gpus_per_replica=1", f"cluster.image={IMAGE}"])

    def gpu_pods(kind):
        groups = cluster_specs(render(cfg, kind)[0])[0]["workerGroupSpecs"]
        return {g["groupName"]: g["maxReplicas"] for g in groups}["gpu"]

    assert (gpu_pods("rayjob"), gpu_pods("raycluster")) == (2, 6)
    assert kind_definition(cfg, "rayjob").stages == ["precompute", "distill", "evaluate"]


def test_render_flags_are_the_schema_fields_and_override_the_definition(capsys, tmp_path):
    flags = cluster_flags()
    schema = ClusterConfig.model_json_schema()

    def leaves(model: dict, prefix: str):
        for name, prop in model["properties"].items():
            ref = next((o["$ref"] for o in [prop, *prop.get("anyOf", [])] if "$ref" in o), None)
            if ref:
                yield from leaves(schema["$defs"][ref.rsplit("/", 1)[-1]], f"{prefix}{name}.")
            else:
                yield f"cluster.{prefix}{name}"

    assert sorted(dotted for dotted, _ in flags.values()) == sorted(leaves(schema, ""))
    assert flags["--gpu-memory"][0] == "cluster.gpu.memory"
    assert flags["--model-cache-claim"][0] == "cluster.model_cache.claim"
    config = str(ROOT / "pipelines/configs/sd35_large_4step.yaml")
    assert cluster_main(["render", "--config", config, "--kind", "rayjob", "--image", IMAGE, "--namespace", "team-a",
                         "--gpu-per-pod", "8",
                         "--gpu-node-selector", "{cloud.google.com/gke-accelerator: nvidia-h200-141gb}",
                         "--image-pull-secrets", "regcred", "--start-deadline-seconds", "600"]) == 0
    job = next(yaml.safe_load_all(capsys.readouterr().out))
    gpu = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert job["metadata"]["namespace"] == "team-a" and job["spec"]["preRunningDeadlineSeconds"] == 600
    assert gpu["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}
    assert gpu["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}] and gpu["replicas"] == 2
    # a bad value fails as one in the file would: one line naming the field, after the heading
    for flag, value, field in [("--namespace", "Bad_NS", "cluster.namespace"),
                               ("--head-memory", "8GB", "cluster.head_memory"),
                               ("--hf-token-secret", "HF Token", "cluster.hf_token_secret"),
                               ("--gpu-extra-resources", "{efa: 1}", "cluster.gpu.extra_resources"),
                               ("--gpu-tolerations", "[{key: a, operator: Exists, value: b}]",
                                "cluster.gpu.tolerations.0")]:
        assert cluster_main(["render", "--config", config, "--kind", "rayjob", "--image", IMAGE, flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and f"with --image {IMAGE} {flag} {value}" in err[0], err
        assert err[1].startswith(f"  - {field}"), err


def test_render_refuses_what_the_crd_refuses(capsys):
    config = str(ROOT / "pipelines/configs/sd35_large_4step.yaml")
    typo = "{nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerm: []}}}"
    assert cluster_main(["render", "--config", config, "--kind", "raycluster", "--image", IMAGE,
                         "--gpu-affinity", typo]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "nodeSelectorTerm" in err and "affinity.nodeAffinity" in err


def test_toleration_and_cache_sections_check_their_fields():
    for bad, words in [({"gpu": {"tolerations": [{"operator": "Equal", "value": "x"}]}}, "needs a key"),
                       ({"model_cache": {"claim": "a", "volume": {"nfs": {}}}}, "exactly one of"),
                       ({"model_cache": {"volume": {"nfs": {}, "csi": {}}}}, "one volume source"),
                       ({"model_cache": {"claim": "a", "path": "cache"}}, "must be absolute"),
                       ({"gpu": {"node_selector": {"-bad": "x"}}}, "not a Kubernetes label key"),
                       ({"gpu": {"affinity": {"nodeAfinity": {}}}}, "nodeAffinity"),
                       ({"start_deadline_seconds": 0}, "greater than or equal to 1")]:
        with pytest.raises(ValueError, match=words):
            ClusterConfig.model_validate(bad)


def test_cluster_package_is_small_modules_and_serve_config_does_not_import_it():
    import subprocess
    import sys

    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "pipelines" / "cluster").glob("*.py")}
    modules = {"shapes.py", "pods.py", "rayjob.py", "raycluster.py", "rayservice.py", "launcher.py", "cli.py"}
    assert modules <= set(sizes)
    assert max(sizes.values()) <= 300, sizes
    code = ("import sys, pipelines.serve.config; "
            "print(sorted(m for m in sys.modules if m.startswith('pipelines.cluster')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr[-2000:]
