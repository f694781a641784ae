"""The private Ray names pipelines/ray_compat.py relies on are still there (no cluster started):
an upgrade that moves one fails here, not in a training run or a deployment."""

import logging
from pathlib import Path

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


def test_train_print_patch_switch_is_the_variable_ray_reads():
    from ray.train.v2._internal import constants

    assert constants.ENABLE_PRINT_PATCH_ENV_VAR in ray_compat.TRAIN_WORKER_ENV


def test_serve_client_knows_its_http_config():
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.context import _get_global_client

    assert callable(_get_global_client)
    assert isinstance(ServeControllerClient.__dict__["http_config"], property)


def test_deployment_version_is_set_only_through_the_internal_flag():
    from ray import serve

    @serve.deployment
    class Probe:
        pass

    assert Probe.options(**ray_compat.deployment_version("abc123")).version == "abc123"
    with pytest.raises(ValueError, match="version"):  # the public argument is refused
        Probe.options(version="abc123")


def test_session_logs_dir_comes_from_the_global_node():
    import ray._private.node
    import ray._private.worker

    assert hasattr(ray._private.worker, "_global_node")
    assert callable(ray._private.node.Node.get_logs_dir_path)


def test_dedup_notes_lose_their_colour():
    import colorama
    from ray._private import ray_logging

    saved = ray_logging._color
    try:
        ray_logging._color = lambda msg: f"{colorama.Fore.GREEN}{msg}{colorama.Style.RESET_ALL}"  # Ray's own
        ray_compat.uncoloured_dedup_notes()
        assert ray_logging._color(" [repeated 2x across cluster]") == " [repeated 2x across cluster]"
        # the deduplicator formats its note through this module function
        assert "+ _color(" in Path(ray_logging.__file__).read_text()
    finally:
        ray_logging._color = saved
