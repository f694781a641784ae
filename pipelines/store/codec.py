"""Tensor columns of the store: each sample's tensor is a Parquet `binary` value holding its raw
little-endian C-order values in the manifest's `storage_dtype` (shape from the manifest), so any
Parquet reader can get them back with numpy alone."""

from __future__ import annotations

import numpy as np

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def latent_column(scale: int) -> str:
    return f"latents_{scale}"


def encode_tensor(t, dtype: str) -> bytes:
    """A torch tensor -> raw little-endian C-order bytes in the storage dtype."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype({"float16": "<f2", "float32": "<f4"}[dtype]).tobytes()


def _decode_column(values, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A column of raw tensor bytes -> float32 array (B, *shape)."""
    buf = b"".join(values)
    if dtype == "bfloat16":  # numpy has no bfloat16: its bits are the top half of a float32
        arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(buf, dtype={"float16": "<f2", "float32": "<f4"}[dtype]).astype(np.float32)
    return arr.reshape(len(values), *shape)


def column_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    c = manifest["latent_channels"]
    shapes = {"prompt_embeds": tuple(manifest["text"]["prompt_embeds_shape"]),
              "pooled_prompt_embeds": tuple(manifest["text"]["pooled_shape"])}
    shapes.update({latent_column(s): (c, s, s) for s in manifest["scales"]})
    return shapes


def decode_numpy(batch: dict, manifest: dict) -> dict:
    """Tensor columns of a batch (dict of column -> sequence of bytes) -> float32 numpy arrays;
    other columns pass through as lists."""
    shapes, dtype = column_shapes(manifest), manifest["storage_dtype"]
    return {k: _decode_column(list(v), dtype, shapes[k]) if k in shapes else list(v) for k, v in batch.items()}
