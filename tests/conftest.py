import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
