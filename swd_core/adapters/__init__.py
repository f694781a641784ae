"""Model-family adapters: the one place that knows a family's components."""

from swd_core.adapters.base import FamilyAdapter, TextEmbeddings
from swd_core.adapters.flux import FluxAdapter
from swd_core.adapters.sd3 import SD3Adapter

FAMILIES = {"sd3": SD3Adapter, "flux": FluxAdapter}


def load_adapter(family: str, path: str, dtype: str = "float32", device: str = "cpu", **kwargs) -> FamilyAdapter:
    """A model family's adapter around its pretrained pipeline.

    Args:
        family (`str`): a key of `FAMILIES` ("sd3", "flux").
        path (`str`): a local folder, a Hugging Face Hub id or a `builtin:` spec.
        dtype (`str`): the weights' dtype, e.g. "bfloat16"; `device` (`str`): where they load.
        kwargs: the family's `from_pretrained` options (`max_sequence_length`, `load_transformer`,
            `load_text_encoders`, ...).

    Returns:
        `FamilyAdapter`
    """
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is not supported; allowed: {sorted(FAMILIES)}")
    return FAMILIES[family].from_pretrained(path, dtype=dtype, device=device, **kwargs)


__all__ = ["FamilyAdapter", "TextEmbeddings", "SD3Adapter", "FluxAdapter", "FAMILIES", "load_adapter"]
