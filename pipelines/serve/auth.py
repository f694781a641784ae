"""Optional bearer-token auth. The key is read on each replica from the environment variable or
the file the definition names (never from the definition itself, so it is in no config file),
compared in constant time, and never logged or echoed. A key file is read again when it changes,
so a key is rotated by rewriting the file (a mounted Secret updates in place), with no redeploy."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from pipelines.schema import ServeConfig
from pipelines.serve.replica import ReplicaConfig
from pipelines.serve.validation import RequestError


def read_api_key(cfg: ServeConfig | ReplicaConfig) -> str | None:
    """The configured key, or None when auth is off. A configured but missing key is an error at
    startup: silently serving without auth would be worse than not serving."""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise RuntimeError(f"serve.api_key_env names {cfg.api_key_env!r}, but that environment variable "
                               "is unset or empty on this replica")
        return key
    if cfg.api_key_file:
        path = Path(cfg.api_key_file)
        if not path.is_file():
            raise RuntimeError(f"serve.api_key_file {str(path)!r} does not exist on this replica")
        key = path.read_text().strip()
        if not key:
            raise RuntimeError(f"serve.api_key_file {str(path)!r} is empty")
        return key
    return None


class BearerAuth:
    def __init__(self, key: str | None, key_file: str | None = None):
        self._key = key.encode() if key else None
        self._file = Path(key_file) if key_file else None
        self._stamp = self._file_stamp()

    @classmethod
    def from_config(cls, cfg: ServeConfig | ReplicaConfig) -> BearerAuth:
        return cls(read_api_key(cfg), cfg.api_key_file)

    def _file_stamp(self):
        try:
            st = self._file.stat() if self._file else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None

    def _refresh(self) -> None:
        """Take the key file's new content when it changed. A file that is gone or empty for a
        moment (mid-rotation) keeps the last key: neither open access nor refusing everyone."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            key = self._file.read_text().strip()
        except OSError:
            return
        if key:
            self._key, self._stamp = key.encode(), stamp

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        if self._key is None:
            return
        if self._file is not None:
            self._refresh()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise RequestError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'")
