"""The private Ray names pipelines/ray_compat.py relies on are still there (no cluster started):
an upgrade that moves one fails here, not in a training run or a deployment."""

import logging

import pytest

from pipelines import ray_compat


def test_train_report_logger_is_named_after_its_private_module():
    from ray.train.v2._internal.execution import context

    assert context.logger.name == context.__file__
    level = context.logger.level
    try:
        ray_compat.quiet_train_report_log()
        assert logging.getLogger(context.__file__).level == logging.WARNING
    finally:
        context.logger.setLevel(level)


def test_train_print_patch_switch_is_the_variable_ray_reads(monkeypatch):
    """Ray's own patch_print_function patches print by default and leaves it alone under TRAIN_WORKER_ENV."""
    import builtins

    from ray.train.v2._internal.logging.patch_print import patch_print_function

    original = builtins.print
    monkeypatch.setattr(builtins, "print", original)  # put back whatever the patch does
    for name in ray_compat.TRAIN_WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    patch_print_function()
    assert builtins.print is not original  # Ray's default: the switch is needed
    builtins.print = original
    for name, value in ray_compat.TRAIN_WORKER_ENV.items():
        monkeypatch.setenv(name, value)
    patch_print_function()
    assert builtins.print is original


def test_serve_http_address_is_the_controllers(monkeypatch):
    """serve_http_address() through Serve's own client, on a stand-in controller (no cluster): the
    client takes the HTTP options from its controller and Serve hands the cached client back."""
    from types import SimpleNamespace

    import ray
    from ray.serve import context
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.config import HTTPOptions

    class Method:  # an actor method whose .remote() "ref" ray.get (patched below) resolves
        def __init__(self, value):
            self.value = value

        def remote(self):
            return self

    controller = SimpleNamespace(get_http_config=Method(HTTPOptions(host="10.1.2.3", port=8123)),
                                 get_root_url=Method("http://10.1.2.3:8123"))
    monkeypatch.setattr(ray, "get", lambda ref, **_: ref.value)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("serve_http_address tried to start Ray"))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "01000000"))
    monkeypatch.setattr(context, "_global_client", ServeControllerClient(controller))
    monkeypatch.setattr(context, "_global_client_job_id", "01000000")  # cached in this job
    assert ray_compat.serve_http_address() == ("10.1.2.3", 8123)


def test_deployment_version_is_set_only_through_the_internal_flag():
    from ray import serve

    @serve.deployment
    class Probe:
        pass

    assert Probe.options(**ray_compat.deployment_version("abc123")).version == "abc123"
    with pytest.raises(ValueError, match="version"):  # the public argument is refused
        Probe.options(version="abc123")


def test_session_logs_dir_and_head_come_from_the_global_node(monkeypatch):
    """Through Ray's own Node methods, on a node object without its processes (no cluster)."""
    import ray._private.worker
    from ray._private.node import Node

    node = object.__new__(Node)
    node._logs_dir, node.head = "/tmp/ray/session_x/logs", True  # what Node.__init__ sets
    monkeypatch.setattr(ray._private.worker, "_global_node", node)
    assert ray_compat.session_logs_dir() == "/tmp/ray/session_x/logs"
    assert ray_compat.started_ray_here() is True
    node.head = False  # a driver that joined a cluster
    assert ray_compat.started_ray_here() is False
    monkeypatch.setattr(ray._private.worker, "_global_node", None)  # not connected
    assert ray_compat.started_ray_here() is False


def test_dedup_notes_lose_their_colour(monkeypatch):
    """Ray's deduplicator, given one line from three workers, writes a coloured "[repeated 2x across
    cluster]" note; after uncoloured_dedup_notes, a plain one."""
    from ray._private import ray_logging

    colorama = ray_logging.colorama  # Ray's vendored copy (importable only once ray is imported)
    # Ray's own wrapper (an earlier test in the process may have replaced it), put back after
    monkeypatch.setattr(ray_logging, "_color", lambda msg: f"{colorama.Fore.GREEN}{msg}{colorama.Style.RESET_ALL}")

    def note() -> str:
        dedup = ray_logging.LogDeduplicator(60, None, None, _timesource=lambda: 0.0)
        for pid in (1, 2, 3):
            dedup.deduplicate({"ip": "10.0.0.1", "pid": pid, "lines": ["loss went down"]})
        (batch,) = dedup.flush()
        return batch["lines"][0]

    assert note().startswith(f"loss went down{colorama.Fore.GREEN} [repeated 2x across cluster]")
    ray_compat.uncoloured_dedup_notes()
    plain = note()
    assert plain.startswith("loss went down [repeated 2x across cluster]") and "\x1b" not in plain
