"""Image metrics of any teacher family, read by pretrained models through transformers:

- `clip_score`: 100 × the cosine between CLIP's image and prompt embeddings, per image (as
  torchmetrics' CLIPScore computes it; default model CLIP ViT-L/14);
- `pickscore`: PickScore v1, a CLIP-H fine-tuned on human preferences, as its model card scores:
  the exponentiated logit scale × that cosine, the model and its processor loaded separately;
- `fd_dinov2`: DINOv2 image features (the CLS token after the final layer norm) whose Fréchet
  distance to a reference set is computed by `swd_core.frechet`.

Each model is loaded by `from_pretrained` from a Hub id or a local folder, once per process and
device (a second scorer of the same model reuses it), and reads images in batches. Images are
given as (N, 3, H, W) tensors in [-1, 1] (what the samplers return) or as PIL images; tensors are
quantized to 8 bits first, as a saved image would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

METRICS = ("clip_score", "pickscore", "fd_dinov2")
DEFAULT_MODELS = {
    "clip": "openai/clip-vit-large-patch14",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "dinov2": "facebook/dinov2-large",
}

_LOADED: dict[tuple, tuple] = {}


def _load(kind: str, path: str, processor_path: str, device: str):
    """(model, processor) of `kind` ("clip" or "dinov2"), loaded once per (paths, device)."""
    key = (kind, path, processor_path, device)
    if key not in _LOADED:
        if kind == "clip":
            from transformers import AutoProcessor, CLIPModel

            model, processor = CLIPModel.from_pretrained(path), AutoProcessor.from_pretrained(processor_path)
        else:
            from transformers import AutoImageProcessor, AutoModel

            model, processor = AutoModel.from_pretrained(path), AutoImageProcessor.from_pretrained(processor_path)
        _LOADED[key] = (model.eval().to(device), processor)
    return _LOADED[key]


def processor_images(images) -> list:
    """What an image processor takes: PIL images as given; a tensor quantized to 8 bits, as a saved
    image would be.

    Args:
        images (`torch.Tensor` or `Sequence[PIL.Image.Image]`): (N, 3, H, W) in [-1, 1], or PIL images.

    Returns:
        `list`: the PIL images, or N uint8 (3, H, W) tensors on the CPU.
    """
    if isinstance(images, torch.Tensor):
        return list(((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return list(images)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns the projected embedding as `pooler_output` of a model output, 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipSimilarity:
    """Per image, `scale` × cos(image embedding, its prompt's embedding) under a CLIP model.

    Args:
        path (`str`): a CLIP checkpoint (Hub id or folder) for `CLIPModel.from_pretrained`.
        processor_path (`str`, *optional*): where its processor is; defaults to `path`.
        scale (`str`): "clip_score" (100, torchmetrics' CLIPScore) or "logit_scale" (the model's
            learned temperature, exponentiated: PickScore's model card).
        device (`str`): where the model runs (loaded once per process and device).
        batch_size (`int`): images per forward pass.
    """

    def __init__(self, path: str, processor_path: str | None = None, *, scale: str = "clip_score",
                 device: str = "cpu", batch_size: int = 32):
        if scale not in ("clip_score", "logit_scale"):
            raise ValueError(f"scale must be clip_score or logit_scale, got {scale!r}")
        self.model, self.processor = _load("clip", path, processor_path or path, device)
        self.scale, self.device, self.batch_size = scale, device, batch_size
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def scores(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Score each image against its own prompt (prompts longer than the text encoder's
        context are truncated).

        Args:
            images (`torch.Tensor` or `Sequence[PIL.Image.Image]`): as `processor_images` takes them.
            prompts (`Sequence[str]`): one per image.

        Returns:
            `np.ndarray`: (N,) float32 scores.
        """
        images = processor_images(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images and {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            pixels = self.processor(images=images[start:stop], return_tensors="pt")["pixel_values"]
            text = self.processor(text=list(prompts[start:stop]), padding=True, truncation=True,
                                  max_length=self.max_tokens, return_tensors="pt")
            img = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            txt = _pooled(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                       attention_mask=text["attention_mask"].to(self.device)))
            cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
            scale = 100.0 if self.scale == "clip_score" else self.model.logit_scale.exp()
            out.append((scale * cos).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class DinoFeatures:
    """DINOv2 features of images: the CLS token after the final layer norm (`pooler_output`),
    the images prepared by the checkpoint's own image processor.

    Args:
        path (`str`): a DINOv2 checkpoint (Hub id or folder) for `AutoModel.from_pretrained`.
        device (`str`): where the model runs (loaded once per process and device).
        batch_size (`int`): images per forward pass.
    """

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 32):
        self.model, self.processor = _load("dinov2", path, path, device)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """The features of each image.

        Args:
            images (`torch.Tensor` or `Sequence[PIL.Image.Image]`): as `processor_images` takes them.

        Returns:
            `np.ndarray`: (N, hidden_size) float32.
        """
        images = processor_images(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start:start + self.batch_size], return_tensors="pt")["pixel_values"]
            out.append(self.model(pixel_values=pixels.to(self.device)).pooler_output.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)


class ImageMetrics:
    """The selected metrics' readings of one model's images: per-prompt `clip_score` and
    `pickscore` values, and the DINOv2 features `fd_dinov2` compares (key `dinov2`).

    Args:
        names (`Sequence[str]`): a subset of `METRICS`.
        models (`dict`): `clip`, `pickscore`, `pickscore_processor`, `dinov2`: Hub ids or folders
            (missing keys: `DEFAULT_MODELS`).
        device (`str`): where the models run.
        batch_size (`int`): images per forward pass.

    Each model loads on the first reading that needs it.
    """

    def __init__(self, names: Sequence[str], models: dict | None = None, *, device: str = "cpu",
                 batch_size: int = 32):
        unknown = sorted(set(names) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown image metric(s) {unknown}; known: {list(METRICS)}")
        self.names = list(dict.fromkeys(names))
        self.models = {**DEFAULT_MODELS, **(models or {})}
        self.device, self.batch_size = device, batch_size
        self._readers: dict[str, object] = {}

    def _reader(self, name: str):
        if name not in self._readers:
            m, kw = self.models, {"device": self.device, "batch_size": self.batch_size}
            self._readers[name] = {
                "clip_score": lambda: ClipSimilarity(m["clip"], scale="clip_score", **kw),
                "pickscore": lambda: ClipSimilarity(m["pickscore"], m["pickscore_processor"],
                                                    scale="logit_scale", **kw),
                "fd_dinov2": lambda: DinoFeatures(m["dinov2"], **kw),
            }[name]()
        return self._readers[name]

    def read(self, images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Read one model's images with the selected metrics.

        Args:
            images (`torch.Tensor` or `Sequence[PIL.Image.Image]`): as `processor_images` takes them.
            prompts (`Sequence[str]`): one per image.

        Returns:
            `dict[str, np.ndarray]`: of the selected ones, "clip_score" (N,), "pickscore" (N,) and
            "dinov2" (N, d), the features `fd_dinov2` compares with `reference_features`.
        """
        out = {}
        for name in self.names:
            if name == "fd_dinov2":
                out["dinov2"] = self._reader(name).features(images)
            else:
                out[name] = self._reader(name).scores(images, prompts)
        return out

    def reference_features(self, images) -> np.ndarray:
        """DINOv2 features of reference images (the teacher's, or the data source's).

        Args:
            images (`torch.Tensor` or `Sequence[PIL.Image.Image]`): as `processor_images` takes them.

        Returns:
            `np.ndarray`: (N, d) float32.
        """
        return self._reader("fd_dinov2").features(images)
