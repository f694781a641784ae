"""Readable output off a terminal: the quieting of library and Ray Data progress bars."""

import json
import os
import subprocess
import sys

import diffusers
import huggingface_hub
import pytest
import transformers
from ray.data import DataContext

from pipelines import ray_runtime
from pipelines.ray_runtime import quiet_libraries, quiet_output, worker_env


@pytest.fixture
def restore_bars():
    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.enable_operator_progress_bars
    hub_off = huggingface_hub.utils.are_progress_bars_disabled()
    yield ctx
    ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved
    if not hub_off:
        huggingface_hub.utils.enable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()  # as conftest leaves them for the session
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture
def color_prefix_unchanged():
    """Fails the test if RAY_COLOR_PREFIX differs after it (monkeypatch undone) from before it."""
    before = os.environ.get("RAY_COLOR_PREFIX")
    yield
    after = os.environ.get("RAY_COLOR_PREFIX")
    assert after == before, "RAY_COLOR_PREFIX leaked out of the test"


@pytest.fixture
def no_color_prefix(color_prefix_unchanged, monkeypatch):
    """RAY_COLOR_PREFIX unset for the test and restored after it. A delenv of an unset variable records
    nothing, so what quiet_output's setdefault writes would outlive the test: setenv first."""
    from ray._private import ray_logging

    monkeypatch.setenv("RAY_COLOR_PREFIX", "")
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    monkeypatch.setattr(ray_logging, "_color", ray_logging._color)  # quiet_output replaces it too


def test_libraries_lose_their_bars(restore_bars):
    diffusers.utils.logging.enable_progress_bar()
    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
    quiet_libraries()
    assert not diffusers.utils.logging.is_progress_bar_enabled()
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()


@pytest.mark.parametrize("tty", [True, False])
def test_ray_data_bars_only_off_a_terminal(no_color_prefix, restore_bars, tty):
    ctx = restore_bars
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = True
    quiet_output(tty=tty)
    assert (ctx.enable_progress_bars, ctx.enable_operator_progress_bars) == (tty, tty)
    assert not diffusers.utils.logging.is_progress_bar_enabled()  # the libraries' bars in either case


def test_worker_env_quiets_worker_processes(monkeypatch):
    monkeypatch.setattr(ray_runtime, "interactive", lambda: False)
    env = worker_env()
    assert env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setattr(ray_runtime, "interactive", lambda: True)
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in worker_env()
    # a fresh process with these variables (as a Ray worker gets them) starts without the bars
    code = ("import json, transformers, huggingface_hub; from ray.data import DataContext; print(json.dumps(["
            "transformers.utils.logging.is_progress_bar_enabled(), huggingface_hub.utils.are_progress_bars_disabled(),"
            "DataContext.get_current().enable_progress_bars]))")
    monkeypatch.setattr(ray_runtime, "interactive", lambda: False)
    out = subprocess.run([sys.executable, "-c", code], env={**_base_env(), **worker_env()}, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [False, True, False]


def _base_env() -> dict:
    quieting = ("HF_HUB_DISABLE_PROGRESS_BARS", "RAY_DATA_DISABLE_PROGRESS_BARS")
    return {k: v for k, v in os.environ.items() if k not in quieting}


@pytest.mark.parametrize("tty", [True, False])
def test_worker_line_prefixes_uncoloured_off_a_terminal(no_color_prefix, restore_bars, tty):
    quiet_output(tty=tty)
    assert os.environ.get("RAY_COLOR_PREFIX") == (None if tty else "0")


def test_gpu_train_workers_choose_their_own_deepspeed_accelerator():
    """A driver without CUDA (a cluster's head, or this CPU box) tells CPU workers to use
    DeepSpeed's CPU accelerator, and leaves GPU workers to choose theirs from their own torch."""
    import torch

    from pipelines.stages.distill.trainer import train_worker_env

    if torch.cuda.is_available():
        pytest.skip("the driver sees CUDA here: it sets no DS_ACCELERATOR for any worker")
    assert worker_env()["DS_ACCELERATOR"] == "cpu"
    assert train_worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    gpu = train_worker_env(use_gpu=True)
    assert "DS_ACCELERATOR" not in gpu and gpu["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
