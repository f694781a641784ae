"""cluster/Dockerfile builds the image the rendered manifests run: Ray's GPU image at the Ray
version cluster/constraints.txt pins (the manifests' rayVersion), with the project installed
under those constraints; `make image` builds it with docker or podman. Building it needs a
registry, so this checks the file against the pins instead."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from pipelines.cluster import RAY_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "cluster" / "Dockerfile").read_text()


def pins() -> dict[str, str]:
    lines = (ROOT / "cluster" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in (x.split("#")[0].strip() for x in lines) if "==" in line)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    kept = "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n\s*", " ", kept)
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip()]


def test_base_image_is_rays_gpu_image_at_the_pinned_version():
    (base,) = [args for op, args in instructions() if op == "FROM"]
    repository, tag = base.split(":")
    assert repository == "rayproject/ray"
    version, python, accelerator = tag.split("-")
    assert version == pins()["ray"] == RAY_VERSION  # the image, the pin and the manifests' rayVersion
    assert python == "py311" and re.fullmatch(r"cu\d+|gpu", accelerator)
    # and the build's own check of what it installed names the same version
    assert re.findall(r"ray.__version__ == '([\d.]+)'", DOCKERFILE) == [RAY_VERSION]


def test_the_project_is_installed_with_the_constraints():
    ops = instructions()
    copies = [args.split()[-2:] for op, args in ops if op == "COPY"]
    assert ["cluster/constraints.txt", "cluster/constraints.txt"] in copies
    runs = [args for op, args in ops if op == "RUN"]
    installs = [shlex.split(cmd) for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    project = [words for words in installs if "." in words]
    assert project and all(words[words.index("-c") + 1] == "cluster/constraints.txt" for words in project)
    # torch comes first, pinned as `make install` pins it, from the base image's CUDA index
    (torch,) = [words for words in installs if "$TORCH_SPEC" in words]
    assert installs.index(torch) < installs.index(project[0])
    args = dict(a.split("=", 1) for op, a in ops if op == "ARG")
    makefile = (ROOT / "Makefile").read_text()
    assert args["TORCH_SPEC"] == re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert args["TORCH_INDEX"].endswith("/" + instructions()[0][1].rsplit("-", 1)[-1])


def test_make_image_builds_the_dockerfile_with_docker_or_podman():
    done = subprocess.run(["make", "-n", "image", "ENGINE=podman", "IMAGE=registry.example/swd-ray:1"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    build = [line for line in done.stdout.splitlines() if " build " in line]
    assert build and shlex.split(build[0])[:4] == ["podman", "build", "-f", "cluster/Dockerfile"]
    assert shlex.split(build[0])[-3:] == ["-t", "registry.example/swd-ray:1", "."]
    default = subprocess.run(["make", "-n", "image", "ENGINE=docker"], cwd=ROOT, capture_output=True, text=True)
    assert f"-t swd-ray:{pins()['ray']} ." in default.stdout
