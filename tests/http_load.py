"""Load against a Serve app from client threads, for as long as a `with` block runs.

Every request's outcome is recorded, a connection-level failure included (a `requests` exception
would otherwise end its thread silently and leave only the answers that came back to check).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class Outcome:
    sent: float  # time.monotonic() when the request left
    status: int | None  # None: no HTTP answer (the exception is in `error`)
    model: str | None  # the x-swd-model header
    body: bytes | str | None  # the PNG/JSON bytes of a 200, the text of anything else
    error: str | None = None
    seconds: float = 0.0  # from sent to answered

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


class Load:
    def __init__(self, send: Callable[[], requests.Response], threads: int = 1, pause: float = 0.0):
        """`pause`: seconds each thread waits between its requests (a steady stream that leaves
        the server's CPU to whatever else the test runs)."""
        self._send, self._pause, self.outcomes = send, pause, []
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                r = self._send()
                out = Outcome(sent, r.status_code, r.headers.get("x-swd-model"), r.content if r.ok else r.text[:300],
                              seconds=time.monotonic() - sent)
            except Exception as e:  # noqa: BLE001 - recorded, then checked by the test
                out = Outcome(sent, None, None, None, f"{type(e).__name__}: {e}", time.monotonic() - sent)
            with self._lock:
                self.outcomes.append(out)
            self._stop.wait(self._pause)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def answered_after(self, moment: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.sent >= moment]

    def wait_for(self, n: int, sent_after: float = float("-inf"), timeout: float = 120) -> list[Outcome]:
        """Block until `n` requests sent after `sent_after` have an outcome; return them."""
        deadline = time.monotonic() + timeout
        while len(got := self.answered_after(sent_after)) < n:
            assert all(t.is_alive() for t in self._threads), "a load thread died"
            assert time.monotonic() < deadline, f"only {len(got)} of {n} requests answered within {timeout:.0f} s"
            time.sleep(0.05)
        return got

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok]
