"""The retraining lock (pipelines/retraining/lease.py): one holder at a time, on a local disk and on a real
S3 endpoint (moto's server), racing processes included; a SIGKILLed holder's lease expires."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pipelines.retraining.lease import Lease, LeaseHeld, read_lease
from pipelines.schema import ResourcesConfig, S3Config


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run" / "retrain.lock"), ResourcesConfig(storage=str(tmp_path))
    endpoint = request.getfixturevalue("s3_server")
    return (f"s3://swd-test/lease-{uuid.uuid4().hex}/retrain.lock",
            ResourcesConfig(storage="s3://swd-test/x", s3=S3Config(endpoint_url=endpoint)))


def test_one_holder_then_the_next(where):
    uri, res = where
    first = Lease(uri, res, ttl_s=30)
    first.acquire()
    with pytest.raises(LeaseHeld, match="is held by"):
        Lease(uri, res, ttl_s=30).acquire()
    assert read_lease(uri, res)["holder"] == first.holder
    first.release()
    assert read_lease(uri, res) is None
    with Lease(uri, res, ttl_s=30) as second:
        assert read_lease(uri, res)["holder"] == second.holder


# Leases renew every ttl / 3: 6 s leaves 4 s for a late renewal thread on a loaded machine. The
# tests wait for what they need to see (a renewal, an expiry) by polling, up to DEADLINE.
TTL = 6.0
DEADLINE = 120.0


def _wait_for(what: str, probe):
    """probe()'s first truthy value, polled every 0.1 s; fails after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not (value := probe()):
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE:.0f} s"
        time.sleep(0.1)
    return value


def _renewed_past(uri, res, holder: str, expiry: float) -> dict:
    """The record once `expiry` has passed and `holder` has renewed it beyond then, with at least a
    third of a ttl left (time for the caller's next step)."""
    def probe():
        record, now = read_lease(uri, res), time.time()
        fresh = record is not None and record["holder"] == holder and record["expires"] > now + TTL / 3
        return record if now > expiry and fresh else None

    return _wait_for(f"renewal of {holder}'s lease past {expiry:.1f}", probe)


def test_renewal_keeps_it_past_its_ttl(where):
    uri, res = where
    with Lease(uri, res, ttl_s=TTL) as held:
        first = read_lease(uri, res)["expires"]
        _renewed_past(uri, res, held.holder, first)  # only renewal keeps it held past its first expiry
        with pytest.raises(LeaseHeld) as refused:
            Lease(uri, res, ttl_s=TTL).acquire()
        assert refused.value.holder["holder"] == held.holder
        held.check()


def _take(uri, storage, endpoint, ttl, barrier, results, done):
    res = ResourcesConfig(storage=storage, s3=S3Config(endpoint_url=endpoint))
    barrier.wait()
    try:
        Lease(uri, res, ttl_s=ttl).acquire()  # held until every taker has answered
        results.put("won")
        done.wait(120)
    except LeaseHeld:
        results.put("held")


def _race(uri, res, n=6):
    ctx = mp.get_context("spawn")
    barrier, results, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_take, args=(uri, res.storage, res.s3.endpoint_url, 30, barrier, results, done))
             for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=DEADLINE) for _ in procs)
    done.set()
    for p in procs:
        p.join(30)
    return outcomes


def test_racing_processes_one_wins(where):
    uri, res = where
    assert _race(uri, res) == ["held"] * 5 + ["won"]


def test_racing_takers_of_a_stale_lease_one_wins(where):
    uri, res = where
    dead = Lease(uri, res, ttl_s=0.5)
    dead.acquire()
    dead._stop.set()  # stops renewing, as a killed holder does; its record stays
    dead._thread.join()
    _wait_for("expiry of the stopped lease", lambda: time.time() > read_lease(uri, res)["expires"])
    assert _race(uri, res) == ["held"] * 5 + ["won"]


HOLDER = """
import signal, sys
from pipelines.retraining.lease import Lease
from pipelines.schema import ResourcesConfig, S3Config
res = ResourcesConfig(storage=sys.argv[2], s3=S3Config(endpoint_url=sys.argv[3] or None))
Lease(sys.argv[1], res, ttl_s=float(sys.argv[4])).acquire()
print("held", flush=True)
signal.pause()  # until SIGKILLed
"""


def test_sigkilled_holder_expires(where):
    uri, res = where
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, res.storage, res.s3.endpoint_url or "", str(TTL)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    taker = Lease(uri, res, ttl_s=TTL)
    try:
        assert proc.stdout.readline().strip() == "held"
        first = read_lease(uri, res)
        _renewed_past(uri, res, first["holder"], first["expires"])  # alive: renewed past its ttl
        with pytest.raises(LeaseHeld):
            taker.acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = read_lease(uri, res)
        assert last["holder"] == first["holder"]  # nobody renews it now: it expires at last["expires"]

        def take():
            try:
                taker.acquire()
                return True
            except LeaseHeld:
                return False

        _wait_for("expiry of the dead holder's lease", take)
        assert time.time() > last["expires"] and read_lease(uri, res)["holder"] == taker.holder
    finally:
        taker.release()
        if proc.poll() is None:
            proc.kill()


def test_a_holder_whose_lease_was_taken_finds_it_lost_and_leaves_the_new_record(where):
    """The lock removed under a holder (an operator, or an expiry the holder missed) and taken by
    another: the holder's next renewal finds it replaced, `check()` raises `LeaseLost` (a cycle
    calls it before each write), and its release leaves the new holder's record alone."""
    from pipelines.retraining.lease import LeaseLost
    from pipelines.storage import filesystem

    uri, res = where
    held = Lease(uri, res, ttl_s=TTL)
    held.acquire()
    try:
        held.check()  # held: nothing to say
        filesystem(uri, res).rm(uri)
        intruder = Lease(uri, res, ttl_s=TTL)
        intruder.acquire()
        _wait_for("renewal failure", lambda: held.lost)
        with pytest.raises(LeaseLost, match="replaced or removed while held"):
            held.check()
    finally:
        held.release()
    assert read_lease(uri, res)["holder"] == intruder.holder
    intruder.release()
    assert read_lease(uri, res) is None


def test_a_stalled_endpoint_fails_the_acquire_instead_of_hanging_it(stalled_endpoint):
    """An S3 endpoint that accepts connections and never answers: the acquire gives up after
    `resources.s3.timeout_s` per try (botocore's retries included) and raises."""
    import threading

    from botocore.exceptions import ReadTimeoutError

    endpoint, held = stalled_endpoint
    res = ResourcesConfig(storage="s3://stalled/x", s3=S3Config(endpoint_url=endpoint, timeout_s=0.2))
    out = {}

    def acquire():
        try:
            Lease("s3://stalled/run/retrain.lock", res, ttl_s=30).acquire()
        except Exception as err:  # noqa: BLE001 - what it raised is the result
            out["err"] = err

    worker = threading.Thread(target=acquire, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the acquire against a stalled endpoint did not end within 60 s"
    assert held and isinstance(out.get("err"), ReadTimeoutError), out


def test_renewals_that_keep_failing_lose_the_lease_once_it_has_expired(tmp_path):
    """Storage errors on renewal (a stalled endpoint's timeouts) are retried while the last record
    still holds; once it has expired the lease is lost, and `check` says why."""
    from pipelines.retraining.lease import LeaseLost

    lease = Lease(str(tmp_path / "retrain.lock"), ResourcesConfig(storage=str(tmp_path)), ttl_s=1.5)
    lease.acquire()
    tries = []

    def failing(tag, body):
        tries.append(time.time())
        raise TimeoutError("read timeout")

    lease._backend.overwrite = failing
    expired_at = lease._expires
    try:
        _wait_for("lost lease", lambda: lease.lost)
        assert len(tries) >= 2 and time.time() + lease.ttl_s / 3 >= expired_at, tries
        with pytest.raises(LeaseLost, match="could not be renewed before it expired: read timeout"):
            lease.check()
    finally:
        lease.release()
