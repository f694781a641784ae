"""docs/cluster.md's first contact (SD3.5 Large on a Kubernetes GPU pool) against what `render`
produces: its render, sed and --dry-run commands are run as written (in a scratch folder), and
every object it names to kubectl (Secrets, the PVC, the RayJob and its submitter Job, Services,
the namespace, node labels), the student's path and the staging command are checked against the
rendered objects."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import kubernetes_validate
import yaml

from pipelines.cluster.cli import main as render_main
from pipelines.cluster.crd import crd_errors
from pipelines.distill import main as pipeline_main

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "cluster.md").read_text()
WALKTHROUGH = DOC[DOC.index("## First contact"):DOC.index("## How pods are sized")]


def commands(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def walk(node, found: dict[str, set]) -> None:
    """Names an object refers to: Secrets, claims, ConfigMaps."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef") or key == "authOptions":
                found["secret"].add(value.get("name") or value.get("secretName"))
            elif key == "imagePullSecrets":
                found["pull"].update(s["name"] for s in value)
            elif key == "persistentVolumeClaim":
                found["pvc"].add(value["claimName"])
            elif key == "configMap":
                found["configmap"].add(value["name"])
            walk(value, found)
    elif isinstance(node, list):
        for item in node:
            walk(item, found)


def run_walkthrough(tmp_path: Path, capsys) -> dict[str, list[dict]]:
    """Run the walkthrough's render, sed and --dry-run lines; {output file: its documents}."""
    def local(word: str) -> str:
        if not word.endswith(".yaml"):
            return word
        if (tmp_path / word).exists():
            return str(tmp_path / word)
        return str(ROOT / word) if (ROOT / word).exists() else word

    rendered = {}
    for line in commands(WALKTHROUGH):
        words = shlex.split(line)
        target = words[words.index(">") + 1] if ">" in words else None
        args = [local(w) for w in (words[:words.index(">")] if target else words)]
        if words[0] == "sed":
            (tmp_path / target).write_text(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
        elif words[:3] == ["python", "-m", "pipelines.cluster"]:
            assert render_main(args[3:]) == 0, (line, capsys.readouterr().err)
            out = capsys.readouterr().out
            (tmp_path / target).write_text(out)
            rendered[target] = [d for d in yaml.safe_load_all(out) if d]
        elif words[:2] == ["python", "pipelines/distill.py"]:
            assert "--dry-run" in words and pipeline_main(args[2:]) == 0, line
            capsys.readouterr()
        elif words[0] == "make":
            assert subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True).returncode == 0, line
    return rendered


def test_first_contact_names_what_render_produces(tmp_path, capsys):
    rendered = run_walkthrough(tmp_path, capsys)
    assert set(rendered) == {"cache-job.yaml", "rayjob.yaml", "rayservice.yaml"}
    docs = [d for ds in rendered.values() for d in ds]
    for d in docs:
        if d["apiVersion"] == "ray.io/v1":
            assert crd_errors(d) == []
        else:
            kubernetes_validate.validate(d, "1.33", strict=True)
    found = {"secret": set(), "pull": set(), "pvc": set(), "configmap": set()}
    walk(docs, found)
    (namespace,) = {d["metadata"]["namespace"] for d in docs}
    objects = {(d["kind"].lower(), d["metadata"]["name"]) for d in docs}
    job = next(d for d in rendered["rayjob.yaml"] if d["kind"] == "RayJob")
    service = rendered["rayservice.yaml"][0]
    name = job["metadata"]["name"]
    # the RayJob's submitter Job and the RayService's Serve Service; the RayJob's head Service is
    # named after its cluster (`<rayjob>-raycluster-<suffix>`), known only from its status
    objects |= {("job", name), ("svc", f"{service['metadata']['name']}-serve-svc")}
    objects |= {("secret", s) for s in found["secret"] | found["pull"]} | {("pvc", c) for c in found["pvc"]}

    # the PVC the walkthrough applies is the claim every pod mounts
    (pvc,) = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", WALKTHROUGH, flags=re.S)]
    kubernetes_validate.validate(pvc, "1.33", strict=True)
    assert (pvc["kind"], pvc["metadata"]["name"], pvc["metadata"]["namespace"]) == (
        "PersistentVolumeClaim", next(iter(found["pvc"])), namespace)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    applied = set(rendered) | {re.search(r"^# (\S+\.yaml)", b, flags=re.M).group(1)
                               for b in re.findall(r"```yaml\n(.*?)```", WALKTHROUGH, flags=re.S)}

    gpu_pod = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    selector = gpu_pod["template"]["spec"]["nodeSelector"]
    cluster_var = None
    problems = []
    for line in commands(WALKTHROUGH):
        words = shlex.split(line)
        if words[0].startswith("CLUSTER=") and "rayClusterName" in line:
            cluster_var = words
            assert f"get rayjob {name}" in line
        if words[0] != "kubectl":
            continue
        if "-n" in words and words[words.index("-n") + 1] != namespace:
            problems.append(f"{line}: namespace")
        if words[1:3] == ["create", "namespace"] and words[3] != namespace:
            problems.append(f"{line}: namespace")
        if "secret" in words and "create" in words:
            kind_at = words.index("secret") + 1
            secret = words[kind_at + 1]
            pool = found["pull"] if words[kind_at] == "docker-registry" else found["secret"]
            if secret not in pool:
                problems.append(f"{line}: no rendered object refers to Secret {secret}")
        rest = [w for i, w in enumerate(words) if w != "-n" and (i == 0 or words[i - 1] != "-n")]
        if rest[1] in ("apply", "delete") and rest[2] == "-f" and rest[3] not in applied:
            problems.append(f"{line}: {rest[3]} is not made in the walkthrough")
        for i, w in enumerate(words):
            ref = re.fullmatch(r"(job|svc|pvc|configmap)/(\S+)", w)
            if ref and ref.group(2) == "$CLUSTER-head-svc":
                if cluster_var is None:
                    problems.append(f"{line}: $CLUSTER before it is set from the RayJob")
            elif ref and (ref.group(1), ref.group(2)) not in objects:
                problems.append(f"{line}: no rendered {ref.group(1)} {ref.group(2)}")
            if w in ("rayjob", "rayservice") and words[i - 1] == "get" and (w, words[i + 1]) not in objects:
                problems.append(f"{line}: no rendered {w} {words[i + 1]}")
            if w == "-l" and words[i + 1].startswith("nvidia.com/"):
                key, value = words[i + 1].split("=")
                if selector.get(key) != value:
                    problems.append(f"{line}: the GPU pods select {selector}")
            if w == "-l" and words[i + 1].startswith("app.kubernetes.io/instance="):
                if words[i + 1].split("=")[1] != job["metadata"]["labels"]["app.kubernetes.io/instance"]:
                    problems.append(f"{line}: label")
    assert not problems, "\n".join(problems)
    assert f"svc/{name}-head-svc" not in WALKTHROUGH

    # names the prose mentions are the rendered ones
    for mentioned in set(re.findall(r"\bswd-sd35-[a-z0-9-]+", WALKTHROUGH)):
        assert any(mentioned == n for _, n in objects) or mentioned == name, mentioned

    # the student: fetched from and served from where the job writes it
    configmap = next(d for d in rendered["rayjob.yaml"] if d["kind"] == "ConfigMap")
    definition = yaml.safe_load(configmap["data"]["definition.yaml"])
    student = f"{definition['resources']['storage'].rstrip('/')}/{definition['name']}/student/merged"
    (cp,) = [shlex.split(c) for c in commands(WALKTHROUGH) if c.startswith("aws s3 cp")]
    assert student in cp
    served = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert served["deployments"][0]["user_config"]["model"] == student

    # the staging command and the cache path the walkthrough names are the Job's
    (stage_job,) = rendered["cache-job.yaml"]
    container = stage_job["spec"]["template"]["spec"]["containers"][0]
    assert " ".join(container["command"]) in WALKTHROUGH
    home = next(e["value"] for e in container["env"] if e["name"] == "HF_HOME")
    assert f"`{home}`" in WALKTHROUGH
    assert f"job/{stage_job['metadata']['name']}" in WALKTHROUGH


def test_walkthrough_check_fails_on_a_stale_name(tmp_path, capsys, monkeypatch):
    """The check above sees a renamed Secret and the RayJob's non-existent head Service."""
    import tests.test_cluster_docs as me

    for old, new in [("create secret generic hf-token", "create secret generic hf-tokens"),
                     ("svc/$CLUSTER-head-svc", "svc/swd-sd35-large-swd-4step-head-svc")]:
        assert old in WALKTHROUGH
        monkeypatch.setattr(me, "WALKTHROUGH", WALKTHROUGH.replace(old, new))
        scratch = tmp_path / new.split()[-1].replace("/", "_").replace("$", "")
        scratch.mkdir()
        try:
            test_first_contact_names_what_render_produces(scratch, capsys)
        except AssertionError as err:
            assert new.split()[-1].split("/")[-1] in str(err)
        else:
            raise AssertionError(f"a walkthrough with {new!r} passed")
