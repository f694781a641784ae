"""A lease: at most one holder at a time for a name under a run's storage (one retraining cycle
per definition), on a local disk or on S3, that expires when its holder dies.

The lease is a small JSON file (holder, pid, host, expiry). Taking it is an atomic create: a
local file opened with O_EXCL, an S3 object written with a conditional PUT (`If-None-Match: *`,
which S3 and moto honour). The holder renews the expiry from a thread every `ttl_s / 3`; a holder
killed by SIGKILL stops renewing, and once the expiry has passed the next taker replaces it with
another atomic step (a rename on disk, a PUT conditional on the stale object's ETag on S3), so
of two takers of a stale lease only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from pipelines.schema import ResourcesConfig


class LeaseHeld(RuntimeError):
    """The lease is held by someone else; `holder` is its record."""

    def __init__(self, uri: str, holder: dict):
        self.holder = holder
        left = holder.get("expires", 0) - time.time()
        super().__init__(f"{uri} is held by {holder.get('holder')} (pid {holder.get('pid')} on {holder.get('host')}, "
                         f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.get('since', 0)))} UTC; "
                         f"expires in {left:.0f} s unless renewed)")


class LeaseLost(RuntimeError):
    """The holder found its lease gone or replaced (it could not renew in time)."""


class _LocalBackend:
    def __init__(self, uri: str):
        self.path = Path(uri)

    def create(self, body: bytes) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return "created"

    def read(self) -> tuple[dict, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data), data.decode()
        except ValueError:  # a create caught between open and write: treat as held, briefly
            return {"holder": "?", "expires": time.time() + 1}, data.decode()

    def replace_stale(self, stale_tag: str, body: bytes) -> str | None:
        # Move the stale file aside (one mover wins), check it was the one we judged stale, then create.
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        if aside.read_text() != stale_tag:  # someone renewed or took it meanwhile: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return None
        aside.unlink()
        return self.create(body)

    def overwrite(self, tag: str, body: bytes) -> str | None:
        current = self.read()
        if current is None or current[1] != tag:
            return None
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(body)
        os.replace(tmp, self.path)  # readers see the old or the new record, never half of one
        return body.decode()

    def delete(self, tag: str) -> None:
        current = self.read()
        if current is not None and current[1] == tag:
            self.path.unlink(missing_ok=True)


class _S3Backend:
    def __init__(self, uri: str, resources: ResourcesConfig):
        import botocore.session
        from botocore.config import Config

        self.bucket, _, self.key = uri.removeprefix("s3://").partition("/")
        # a stalled endpoint fails the request (botocore's retries included) instead of hanging
        # the cycle that holds the lock, or its renewal thread
        timeout = resources.s3.timeout_s
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=resources.s3.endpoint_url, region_name=resources.s3.region or os.environ.get(
                "AWS_DEFAULT_REGION", "us-east-1"), config=Config(connect_timeout=timeout, read_timeout=timeout))

    def _put(self, body: bytes, **cond) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"]
        except ClientError as err:
            if (err.response.get("Error", {}).get("Code")
                    in ("PreconditionFailed", "ConditionalRequestConflict", "412")):
                return None
            raise

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> tuple[dict, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return json.loads(obj["Body"].read()), obj["ETag"]

    def replace_stale(self, stale_tag: str, body: bytes) -> str | None:
        return self._put(body, IfMatch=stale_tag)

    def overwrite(self, tag: str, body: bytes) -> str | None:
        return self._put(body, IfMatch=tag)

    def delete(self, tag: str) -> None:
        current = self.read()
        if current is not None and current[1] == tag:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class Lease:
    """`with Lease(uri, resources, ttl_s):` holds the lease for the block, or raises `LeaseHeld`."""

    def __init__(self, uri: str, resources: ResourcesConfig, ttl_s: float = 60.0, holder: str | None = None):
        self.uri, self.ttl_s = uri, ttl_s
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._backend = _S3Backend(uri, resources) if uri.startswith("s3://") else _LocalBackend(uri)
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = time.time()
        self._expires = 0.0  # of the last record written
        self.lost: str | None = None  # why renewal failed, if it did

    def _record(self) -> bytes:
        self._expires = time.time() + self.ttl_s
        return json.dumps({"holder": self.holder, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": self._since, "expires": self._expires}).encode()

    def acquire(self) -> None:
        body = self._record()
        tag = self._backend.create(body)
        if tag is None:
            current = self._backend.read()
            if current is not None and current[0].get("expires", 0) > time.time():
                raise LeaseHeld(self.uri, current[0])
            # stale (its holder stopped renewing) or just released: take it in one atomic step
            tag = (self._backend.replace_stale(current[1], body) if current is not None
                   else self._backend.create(body))
            if tag is None:
                now = self._backend.read()
                raise LeaseHeld(self.uri, now[0] if now else {"holder": "another taker"})
        self._tag = body.decode() if tag == "created" else tag
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            held_until = self._expires
            try:
                tag = self._backend.overwrite(self._tag, self._record())
            except Exception as err:  # a storage error (a timeout): try again while the last record holds
                self._expires = held_until
                if time.time() + self.ttl_s / 3 >= held_until:
                    self.lost = f"the lease at {self.uri} could not be renewed before it expired: {err}"
                    return
                continue
            if tag is None:
                self.lost = f"the lease at {self.uri} was replaced or removed while held"
                return
            self._tag = tag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._tag is not None and self.lost is None:
            self._backend.delete(self._tag)
        self._tag = None

    def check(self) -> None:
        """Raise `LeaseLost` if renewal failed (call before writing what the lease protects)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease(uri: str, resources: ResourcesConfig) -> dict | None:
    """The current record at `uri` (held or stale), or None."""
    backend = _S3Backend(uri, resources) if uri.startswith("s3://") else _LocalBackend(uri)
    current = backend.read()
    return current[0] if current else None
