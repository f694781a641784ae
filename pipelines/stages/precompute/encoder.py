"""Pass 2 of the precompute stage: usable rows -> store rows (text embeddings and VAE latents at
every scale), in actors holding the text encoders and the VAE, never the transformer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipelines import store
from pipelines.stages.precompute.checks import load_rgb, sample_id, stored_caption
from pipelines.stages.precompute.spec import EncodeSpec


def square_pixels(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> center-cropped square float (1, 3, S, S) in [-1, 1]."""
    from swd_core.toy.shapes import from_uint8

    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.array(rgb[top:top + side, left:left + side])  # a writable copy for torch
    return from_uint8(torch.from_numpy(crop).permute(2, 0, 1)[None])


def data_schema(scales) -> pa.Schema:
    return pa.schema([("sample_id", pa.string()), ("caption", pa.string()), ("prompt_embeds", pa.binary()),
                      ("pooled_prompt_embeds", pa.binary())] + [(store.latent_column(s), pa.binary()) for s in scales])


def encoder_device(spec: EncodeSpec) -> str:
    from pipelines.placement import stage_device

    return stage_device("precompute", "precompute.gpus_per_actor", spec.gpus)


class Encoder:
    """Pass 2, one per actor: rows -> store rows. Holds the text encoders and the VAE only.

    `keep` is the set of refs to encode (wrapped in a list so Ray passes the ObjectRef through
    to `ray.get` here rather than copying the set into every actor's arguments)."""

    def __init__(self, spec: EncodeSpec, keep=None):
        from pipelines.ray_runtime import quiet_libraries
        from swd_core.adapters import load_adapter

        quiet_libraries()  # an actor process: the driver's settings do not reach it
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.adapter = load_adapter(spec.family, spec.teacher, dtype=spec.dtype, device=encoder_device(spec),
                                    max_sequence_length=spec.max_sequence_length, load_transformer=False)
        if keep is not None and not isinstance(keep, (set, frozenset)):
            import ray

            keep = ray.get(keep[0])
        self.keep = keep
        self.schema = data_schema(spec.scales)

    @torch.no_grad()
    def encode(self, images: list[bytes], captions: list[str]) -> dict:
        """The store row values for usable (image, caption) pairs (already checked)."""
        from swd_core.scale_ops import downscale_pixels

        spec, dt = self.spec, self.spec.storage_dtype
        pixels = [square_pixels(load_rgb(b)[0]) for b in images]
        captions = [stored_caption(c) for c in captions]  # as pass 1 hashed them: no control characters
        text = self.adapter.encode_prompts([c.strip() for c in captions])
        cols = {"sample_id": [sample_id(b, c) for b, c in zip(images, captions)],
                "caption": [c.strip() for c in captions],
                "prompt_embeds": [store.encode_tensor(t, dt) for t in text.prompt_embeds],
                "pooled_prompt_embeds": [store.encode_tensor(t, dt) for t in text.pooled]}
        for s in spec.scales:
            batch = torch.cat([downscale_pixels(p, s * spec.downsample) for p in pixels])
            latents = self.adapter.encode_images(batch)
            cols[store.latent_column(s)] = [store.encode_tensor(z, dt) for z in latents]
        return cols

    def __call__(self, batch: dict) -> pa.Table:
        rows = [(b, c) for r, b, c in zip(batch["ref"], batch["image"], batch["caption"])
                if self.keep is None or r in self.keep]
        if not rows:
            return self.schema.empty_table()
        images, captions = zip(*rows)
        # One call gets a whole read task's rows (see `run`); the models see `batch_size` at a time.
        step = self.spec.batch_size
        return pa.concat_tables([pa.table(self.encode(list(images[i:i + step]), list(captions[i:i + step])),
                                          schema=self.schema) for i in range(0, len(images), step)])


def text_shapes(spec: EncodeSpec) -> dict:
    """Empty-prompt embeddings (computed once, beside the manifest) and the text shapes."""
    from pipelines.ray_runtime import quiet_libraries
    from swd_core.adapters import load_adapter

    quiet_libraries()  # a task process: the driver's settings do not reach it

    device = encoder_device(spec)
    adapter = load_adapter(spec.family, spec.teacher, dtype=spec.dtype, device=device,
                           max_sequence_length=spec.max_sequence_length, load_transformer=False)
    empty = adapter.empty_prompt().to("cpu", adapter.dtype)
    return {"device": device, "prompt_embeds": empty.prompt_embeds, "pooled": empty.pooled,
            "prompt_embeds_shape": list(empty.prompt_embeds.shape[1:]), "pooled_shape": list(empty.pooled.shape[1:])}
