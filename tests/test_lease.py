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


def test_renewal_keeps_it_past_its_ttl(where):
    uri, res = where
    with Lease(uri, res, ttl_s=1.5) as held:
        time.sleep(3.5)  # more than two ttls: only renewal keeps the expiry ahead
        with pytest.raises(LeaseHeld):
            Lease(uri, res, ttl_s=1.5).acquire()
        held.check()


def _take(uri, storage, endpoint, ttl, barrier, results):
    res = ResourcesConfig(storage=storage, s3=S3Config(endpoint_url=endpoint))
    barrier.wait()
    try:
        Lease(uri, res, ttl_s=ttl).acquire()  # held until the process exits
        results.put("won")
        time.sleep(2)
    except LeaseHeld:
        results.put("held")


def _race(uri, res, n=6):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_take, args=(uri, res.storage, res.s3.endpoint_url, 30, barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
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
    time.sleep(1.0)
    assert _race(uri, res) == ["held"] * 5 + ["won"]


HOLDER = """
import sys, time
from pipelines.retraining.lease import Lease
from pipelines.schema import ResourcesConfig, S3Config
res = ResourcesConfig(storage=sys.argv[2], s3=S3Config(endpoint_url=sys.argv[3] or None))
Lease(sys.argv[1], res, ttl_s=2.0).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_sigkilled_holder_expires(where):
    uri, res = where
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri, res.storage, res.s3.endpoint_url or ""],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "held"
        time.sleep(3)  # alive: renewed past its 2 s ttl
        with pytest.raises(LeaseHeld):
            Lease(uri, res, ttl_s=2.0).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while True:
            try:
                Lease(uri, res, ttl_s=2.0).acquire()
                break
            except LeaseHeld:
                assert time.time() < deadline, "the dead holder's lease never expired"
                time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
