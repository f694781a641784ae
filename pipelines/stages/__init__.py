"""One module per pipeline stage; each reads what the previous stage wrote.

`AVAILABLE` is the one registry of implemented stages: the plan marks the others, the runner
skips them. Each module exposes `run(cfg) -> dict`.
"""

from __future__ import annotations

import importlib

AVAILABLE = {"preview": "pipelines.stages.preview"}


def run_stage(name: str, cfg) -> dict:
    return importlib.import_module(AVAILABLE[name]).run(cfg)
