"""One module per pipeline stage; each reads what the previous stage wrote.

`AVAILABLE` is the one registry of implemented stages: the plan marks the others, the runner
skips them. Each module exposes `run(cfg) -> dict`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipelines.schema import STAGES

# A stage is available when its module exists: pipelines/stages/<stage>.py, or the package
# pipelines/stages/<stage>/ for a stage of several modules.
HERE = Path(__file__).parent
AVAILABLE = {s: f"pipelines.stages.{s}" for s in STAGES
             if (HERE / f"{s}.py").exists() or (HERE / s / "__init__.py").exists()}


def run_stage(name: str, cfg) -> dict:
    return importlib.import_module(AVAILABLE[name]).run(cfg)
