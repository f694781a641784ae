"""SIGTERM handled like Ctrl-C by every entry point (distill.py, retrain.py, `--stages deploy`).

SIGTERM is how Kubernetes, `ray job stop` and systemd stop a process. Left to Ray, it ends a
driver badly: `ray.init` replaces the Python handler with one that calls `sys.exit(15)`, and the
driver's core worker installs a C-level failure handler (absl's) that prints a stack dump, passes
the signal on, and arms a 3-second alarm whose handler aborts the process: any stop that takes
longer than that (leaving a Ray Data execution, shutting Serve down) ends in SIGABRT, exit 134.

`stoppable` installs a handler that does what Ctrl-C does at that moment (Ray Train's handler
during `fit` aborts the run gracefully; otherwise a KeyboardInterrupt), after one line saying so;
`ensure_ray` installs it again after `ray.init` (`across_ray_init`). `finally` blocks then run as on Ctrl-C: the
retrain lock is released, Serve is shut down, checkpoints are left as the last one was written.
The process exits 143 (128 + SIGTERM), 130 on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from pipelines.logs import stamp

_prefix: str | None = None  # set while an entry point runs under `stoppable`
_received: int | None = None  # the stop signal that came, if any


def _say(signum: int) -> None:
    # os.write, not print or logging: the handler may interrupt a write to the same stream, or a
    # logging call holding its handler's lock
    name = signal.Signals(signum).name
    os.write(sys.stderr.fileno(), f"{stamp()} {_prefix} {name} received: stopping\n".encode())


def _on_signal(signum: int, frame) -> None:
    global _received
    if _received is None:
        _say(signum)
    _received = signum
    ctrl_c = signal.getsignal(signal.SIGINT)
    if signum == signal.SIGTERM and callable(ctrl_c) and ctrl_c not in (_on_signal, signal.default_int_handler):
        try:
            ctrl_c(signal.SIGINT, frame)  # e.g. Ray Train's graceful abort of a running fit (it exits)
        except Exception:  # noqa: BLE001 - a handler that cannot act; the stop goes on
            pass
    raise KeyboardInterrupt


def install() -> None:
    """(Re)install the handlers, when an entry point runs under `stoppable` (in its main thread).
    SIGINT's only when no one replaced ours: Ray Train puts its own in place during `fit`."""
    if _prefix is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_signal)


@contextmanager
def across_ray_init():
    """Around `ray.init`, which puts Ray's SIGTERM handler (`sys.exit(15)`) in place of ours: a
    SIGTERM during it is taken as ours, and ours is installed again after it."""
    try:
        yield
    except SystemExit as err:
        if _prefix is None or err.code != signal.SIGTERM:
            raise
        signal.alarm(0)  # the abort timer of Ray's C-level handler, if it saw the signal first
        _on_signal(signal.SIGTERM, None)
    install()


def stoppable(prefix: str, main: Callable[[], int]) -> int:
    """Run `main` with SIGTERM handled like Ctrl-C; its exit code, or 128 + the stop signal."""
    global _prefix, _received
    main_thread = threading.current_thread() is threading.main_thread()
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) if main_thread else None
    _prefix, _received = prefix, None
    install()
    try:
        return main()
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and _received is None:
            raise  # an exit of main's own
        if _received is None:  # Ctrl-C
            _say(signal.SIGINT)
        return 128 + (_received or signal.SIGINT)
    finally:
        _prefix = None
        if before is not None:  # a caller in the same process (tests, `swd`) gets its handlers back
            signal.signal(signal.SIGTERM, before[0] if before[0] is not None else signal.SIG_DFL)
            signal.signal(signal.SIGINT, before[1] if before[1] is not None else signal.default_int_handler)
