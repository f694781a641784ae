"""The load helper of the Serve and retraining tests records every request's outcome: a dropped
connection is a failure on record, not a client thread that ended quietly."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.http_load import Load


class _Flaky(BaseHTTPRequestHandler):
    """Answers 200 with a model header, except every third request: the connection is dropped."""

    count = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - http.server's name
        with _Flaky.lock:
            _Flaky.count += 1
            n = _Flaky.count
        if n % 3 == 0:
            self.close_connection = True
            self.connection.shutdown(2)  # no status line: the client sees a connection error
            return
        self.send_response(200)
        self.send_header("x-swd-model", "m1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_url():
    _Flaky.count = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def test_dropped_connections_are_recorded_as_failures(flaky_url):
    with requests.Session() as session, Load(lambda: session.get(flaky_url, timeout=10), threads=2) as load:
        got = load.wait_for(9)
    assert len(got) >= 9 and len(load.outcomes) >= len(got)
    failures = load.failures()
    assert failures, "a dropped connection was not recorded"
    assert all(o.status is None and o.error and "ConnectionError" in o.error for o in failures)
    assert {o.model for o in load.outcomes if o.ok} == {"m1"}


def test_waiting_for_answers_fails_when_none_come():
    def never():
        raise requests.ConnectionError("refused")

    with Load(never) as load:
        assert load.wait_for(3)  # refusals are outcomes too
    assert len(load.failures()) == len(load.outcomes) >= 3
    with Load(lambda: threading.Event().wait(2) or requests.Response()) as slow:
        with pytest.raises(AssertionError, match=r"only 0 of 1 requests answered within 1 s"):
            slow.wait_for(1, timeout=1)
