import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see pipelines/distill.py

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.ray_nodes import LocalCluster, free_port  # noqa: E402,F401  (free_port: tests import it from here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The test clusters listen on 127.0.0.1; without this a driver resolves its own address to the
# machine's IP and `ray.init(address=...)` can wait forever for a GCS that is not there.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# where `make install` compiled DeepSpeed's CPU collectives op, with the venv's ninja (see the Makefile)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
if not os.environ["PATH"].startswith(os.path.dirname(sys.executable) + os.pathsep):
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
# The test clusters run without token auth; drivers and `ray job` clients must not send a token
# from ~/.ray either.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Fake credentials for the moto S3 server; set before any Ray node starts so workers inherit them.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)


# Lines a test wants in the run's output whatever the capture mode (e.g. how many requests a
# property-based test sent): a test adds ("summary", line) to `request.node.user_properties`,
# which its report carries to the terminal summary.
SUMMARY: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        SUMMARY.extend(value for name, value in report.user_properties if name == "summary")


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("test measurements")
        for line in SUMMARY:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    for item in items:
        # A test on the shared cluster is a Ray test whatever its module says: `make test-fast`
        # (-m "not ray") must never start one.
        if "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


def pytest_configure(config):
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)


TINY = "builtin:tiny-sd3?layers=3"


@pytest.fixture
def tiny_adapter():
    """A fresh small SD3 pipeline (3 blocks, random weights) loaded through from_pretrained."""
    from swd_core.adapters import load_adapter

    return load_adapter("sd3", TINY, max_sequence_length=0)


@pytest.fixture
def toy_schedule():
    from swd_core.schedules import preset

    return preset("toy_4step", patch_size=2)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local multi-node Ray cluster on 127.0.0.1, started with `ray start` as users start
    one: a head and one worker node, 2 CPUs each, joined by this process as a driver.

    One per pytest run, shared by every end-to-end test. Ray Train runs place workers on both
    nodes with the SPREAD strategy. The worker node declares one GPU that this machine does not
    have (Ray takes resource counts on trust), so tests can reserve GPUs and check what a stage
    does when CUDA is not there.
    """
    import ray

    cluster = LocalCluster.start(head_cpus=2, workers=[{"cpus": 2, "gpus": 1}])
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=True)
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol endpoint (moto in server mode) on 127.0.0.1 with a bucket `swd-test`.

    Yields the endpoint URL; pass it explicitly (pipeline definition `resources.s3.endpoint_url`,
    s3fs `endpoint_url`, pyarrow `endpoint_override`): pyarrow ignores endpoint variables.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="swd-test")
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def stalled_endpoint():
    """An endpoint on 127.0.0.1 that accepts connections and never answers. Yields (its URL, the
    connections it accepted)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    held = []  # accepted and never answered

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", held
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture(scope="session")
def _deepspeed_process_group():
    from tests.deepspeed_world import one_process_world

    with one_process_world():
        yield


@pytest.fixture
def deepspeed_world(_deepspeed_process_group, monkeypatch):
    """A one-process DeepSpeed world (gloo, CPU) for tests that build real engines without Ray."""
    from tests.deepspeed_world import WORLD_ENV

    for key, value in WORLD_ENV.items():
        monkeypatch.setenv(key, value)
    # A ZeRO-3 engine replaces torch.nn.functional.linear for the whole process (DeepSpeed's
    # zero3_linear_wrap, never put back): later tests that compare sampled pixels exactly with
    # another process's would see a different matmul
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
