"""The project's log lines: one line per event, `<time> [stage] message`, from per-module loggers.

Every module logs through `logger(__name__)`. A line's tag is the stage or service its module
belongs to (`pipelines.stages.distill.export` → `[distill]`, `pipelines.retraining.cycle` →
`[retrain]`) unless the call names one (`extra={"tag": "precompute"}`). Info and debug lines go
to stdout, warnings and errors to stderr, each with a timestamp: a distill run lasts hours and a
retraining scheduler months, and a job log has no other clock. Ray Train workers other than rank
0 keep only warnings and errors, so an event is one line, not one per worker.

The level comes from the entry point's `--quiet` (warnings and errors) or `--verbose` (debug
lines, and Ray's own info logs), and reaches Ray workers through `SWD_LOG_LEVEL`.
"""

from __future__ import annotations

import logging
import os
import sys
import time

LEVEL_ENV = "SWD_LOG_LEVEL"
ROOT = "pipelines"
# modules whose tag is not their own name
_TAGS = {"retraining": "retrain", "distill": "pipeline"}


def tag_of(name: str) -> str:
    """The tag of a logger named for its module."""
    parts = name.split(".")
    if parts[0] != ROOT or len(parts) < 2:
        return parts[-1]
    if parts[1] == "stages" and len(parts) > 2:
        return parts[2]
    return _TAGS.get(parts[1], parts[1])


def stamp(at: float | None = None) -> str:
    """A line's time, local: `2026-12-07 03:00:01`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


class LineFormatter(logging.Formatter):
    """`2026-12-07 03:00:01 [retrain] message`; warnings and errors say so after the tag."""

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", None) or tag_of(record.name)
        level = "" if record.levelno in (logging.INFO, logging.DEBUG) else f"{record.levelname.lower()}: "
        line = f"{stamp(record.created)} [{tag}] {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class RankFilter(logging.Filter):
    """In a Ray Train worker: rank 0 says what happens; the other ranks only what goes wrong."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def _level(level: int | str | None) -> int:
    if level is None:
        level = os.environ.get(LEVEL_ENV, "INFO")
    if isinstance(level, str):
        named = logging.getLevelName(level.upper())
        if not isinstance(named, int):
            raise ValueError(f"{LEVEL_ENV}={level!r}: not a logging level (DEBUG, INFO, WARNING, ERROR)")
        level = named
    return level


def configure(level: int | str | None = None, rank: int | None = None) -> logging.Logger:
    """(Re)configure the project's lines in this process: the level (None: `SWD_LOG_LEVEL`, else
    info) and, in a Ray Train worker, its rank. Each call replaces the previous handlers, so the
    streams are the current `sys.stdout`/`sys.stderr` (as pytest's capture swaps them)."""
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(_level(level))
    root.propagate = False
    if root.level >= logging.WARNING:  # --quiet: Ray Data's and Ray Train's info lines too
        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    out, err = _StreamHandler(sys.stdout, "stdout"), _StreamHandler(sys.stderr, "stderr")
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(LineFormatter())
        if rank is not None:
            handler.addFilter(RankFilter(rank))
        root.addHandler(handler)
    return root


class _StreamHandler(logging.StreamHandler):
    """A handler on `sys.<name>` as it is when a line is written (pytest and Ray swap the streams)."""

    def __init__(self, stream, name: str):
        super().__init__(stream)
        self.name_of_stream = name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.name_of_stream)
        super().emit(record)


def add_verbosity_arguments(parser) -> None:
    """`--quiet` and `--verbose`, for every entry point that runs stages (an argparse parser)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="print debug lines too, and Ray's own info logs")


def apply_verbosity(args) -> str:
    """The level `--quiet`/`--verbose` ask for (else `SWD_LOG_LEVEL`, else info), set for this
    process and, through `SWD_LOG_LEVEL`, for the Ray workers it starts."""
    level = "WARNING" if args.quiet else "DEBUG" if args.verbose else logging.getLevelName(_level(None))
    os.environ[LEVEL_ENV] = level
    configure(level)
    return level


def logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass `__name__`), with the project's lines set up in this
    process if nothing set them up yet (a Ray task or actor that logs)."""
    if not name.startswith(f"{ROOT}."):  # e.g. "__main__" in a script: its lines would go nowhere
        raise ValueError(f"logger({name!r}): pass the module's dotted name under {ROOT}.")
    if not logging.getLogger(ROOT).handlers:
        configure()
    return logging.getLogger(name)
