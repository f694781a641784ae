"""Shared helpers for benchmarks: machine description, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        # tracked files that differ from that commit: the numbers then come from a working tree
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except OSError:
        commit, dirty = "", []
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "git_commit": commit, "git_modified": dirty,
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               sync: Callable[[], object] | None = None) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed calls. `sync` (e.g.
    `torch.cuda.synchronize`) runs before and after each timed call: GPU kernels are
    asynchronous, so only finished work is timed."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_result(name: str, payload: dict, path: Path | None = None) -> Path:
    """`payload` with the command, machine and time, as bench/results/<name>.json or at `path`."""
    payload = {
        **payload,
        "command": payload.get("command") or " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
