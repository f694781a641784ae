"""The evaluator for the shapes domain: a small classifier that reads each cell of the 3×3
grid (shape or empty, colour, size) and the background, and the metrics built on it:

- prompt accuracy: the fraction of generated images whose every prompted attribute is right
  (a GenEval analogue), with a per-attribute breakdown;
- Fréchet distance between classifier features of generated and real images (an FID analogue,
  by `swd_core.frechet`);
- PSNR, for the VAE's reconstructions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from swd_core.toy.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, ShapeObject, ShapesSample, relation_holds

SHAPE_CLASSES = ("none",) + SHAPES
COLOR_CLASSES = tuple(COLORS)
SIZE_CLASSES = tuple(SIZES)
BACKGROUND_CLASSES = tuple(BACKGROUNDS)


def _block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.GELU())


class ShapesClassifier(nn.Module):
    """A small CNN: 64×64 image -> per-cell (shape, colour, size) logits, background logits and
    a pooled feature vector (for the Fréchet distance).

    Args:
        width (`int`): the first convolutions' channels.
        feature_dim (`int`): the last convolutions' channels, and the feature vector's size.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.trunk = nn.Sequential(
            _block(3, width, 1), _block(width, width, 2),  # 32
            _block(width, 2 * width, 1), _block(2 * width, 2 * width, 2),  # 16
            _block(2 * width, feature_dim, 1), _block(feature_dim, feature_dim, 2),  # 8
        )
        self.cells = nn.AdaptiveAvgPool2d(3)
        self.cell_head = nn.Linear(feature_dim, len(SHAPE_CLASSES) + len(COLOR_CLASSES) + len(SIZE_CLASSES))
        self.background_head = nn.Linear(feature_dim, len(BACKGROUND_CLASSES))
        self.width, self.feature_dim = width, feature_dim

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classify the 3×3 grid's cells and the background.

        Args:
            images (`torch.Tensor`): (B, 3, 64, 64) in [-1, 1].

        Returns:
            `dict[str, torch.Tensor]`: logits "shape" (B, 9, len(SHAPE_CLASSES)), "color" and
            "size" (B, 9, ...) for the row-major cells, "background" (B, len(BACKGROUND_CLASSES)),
            and the pooled "features" (B, feature_dim).
        """
        fmap = self.trunk(images)
        cells = self.cells(fmap).flatten(2).transpose(1, 2)  # (B, 9, C), row-major cells
        logits = self.cell_head(cells)
        ns, nc = len(SHAPE_CLASSES), len(COLOR_CLASSES)
        features = fmap.mean(dim=(2, 3))
        return {"shape": logits[..., :ns], "color": logits[..., ns:ns + nc], "size": logits[..., ns + nc:],
                "background": self.background_head(features), "features": features}


@dataclass
class SceneReading:
    """What the classifier sees in one image.

    Args:
        objects (`list[ShapeObject]`): the non-empty cells, each with its position.
        objectness (`list[float]`): 1 - p(empty) for each object, to rank them.
        background (`str`): the background colour.
    """

    objects: list[ShapeObject]
    objectness: list[float]  # 1 - p(empty) for each object
    background: str


def targets_from_sample(sample: ShapesSample) -> dict[str, torch.Tensor]:
    """The classifier's training targets for a scene.

    Args:
        sample (`ShapesSample`): the scene.

    Returns:
        `dict[str, torch.Tensor]`: class indices "shape", "color", "size" (9 each, row-major cells;
        colour and size -100 on empty cells, which cross-entropy ignores) and "background" (a scalar).
    """
    shape = torch.zeros(9, dtype=torch.long)
    color = torch.full((9,), -100, dtype=torch.long)  # -100: ignored by cross-entropy (empty cell)
    size = torch.full((9,), -100, dtype=torch.long)
    for o in sample.objects:
        cell = o.row * 3 + o.col
        shape[cell] = SHAPE_CLASSES.index(o.shape)
        color[cell] = COLOR_CLASSES.index(o.color)
        size[cell] = SIZE_CLASSES.index(o.size)
    return {"shape": shape, "color": color, "size": size,
            "background": torch.tensor(BACKGROUND_CLASSES.index(sample.background))}


def classifier_loss(out: dict, targets: dict) -> torch.Tensor:
    """The classifier's training loss: the sum of the four cross-entropies.

    Args:
        out (`dict`): `ShapesClassifier.forward`'s output.
        targets (`dict`): `targets_from_sample`'s, stacked over the batch.

    Returns:
        `torch.Tensor`: a scalar.
    """
    return (F.cross_entropy(out["shape"].flatten(0, 1), targets["shape"].flatten())
            + F.cross_entropy(out["color"].flatten(0, 1), targets["color"].flatten())
            + F.cross_entropy(out["size"].flatten(0, 1), targets["size"].flatten())
            + F.cross_entropy(out["background"], targets["background"]))


@torch.no_grad()
def read_scenes(classifier: ShapesClassifier, images: torch.Tensor,
                batch_size: int = 128) -> tuple[list[SceneReading], torch.Tensor]:
    """Read the scenes in images (the most likely class per cell; cells read as empty are left out).

    Args:
        classifier (`ShapesClassifier`): the evaluator; put in eval mode.
        images (`torch.Tensor`): (N, 3, 64, 64) in [-1, 1].
        batch_size (`int`): images per forward pass.

    Returns:
        `tuple[list[SceneReading], torch.Tensor]`: one reading per image, and the (N, feature_dim) features.
    """
    readings, feats = [], []
    classifier.eval()
    for start in range(0, len(images), batch_size):
        out = classifier(images[start:start + batch_size].float())
        feats.append(out["features"])
        p_shape = out["shape"].softmax(-1)
        for b in range(p_shape.shape[0]):
            objs, conf = [], []
            for cell in range(9):
                k = int(p_shape[b, cell].argmax())
                if k == 0:
                    continue
                objs.append(ShapeObject(SHAPE_CLASSES[k], COLOR_CLASSES[int(out["color"][b, cell].argmax())],
                                        SIZE_CLASSES[int(out["size"][b, cell].argmax())], cell // 3, cell % 3))
                conf.append(float(1 - p_shape[b, cell, 0]))
            readings.append(SceneReading(objs, conf, BACKGROUND_CLASSES[int(out["background"][b].argmax())]))
    return readings, torch.cat(feats) if feats else torch.zeros(0, classifier.feature_dim)


ATTRIBUTES = ("count", "shape", "color", "size", "position", "background", "relation")


def judge(sample: ShapesSample, reading: SceneReading) -> dict[str, bool | None]:
    """Whether an image's reading matches its prompt, attribute by attribute. The prompt's
    objects are matched to the most confidently detected ones (both orders for two objects).

    Args:
        sample (`ShapesSample`): the prompt's scene.
        reading (`SceneReading`): what the classifier read in the image generated for it.

    Returns:
        `dict[str, bool | None]`: per attribute of `ATTRIBUTES`, right (True), wrong (False) or
        not prompted (None); plus "all", True when every prompted attribute is right.
    """
    want = sample.objects
    # Match the prompt's objects to the most confident detected objects (both orders for two).
    ranked = [o for _, o in sorted(zip(reading.objectness, reading.objects), key=lambda t: -t[0])]
    found = ranked[:len(want)]
    result: dict[str, bool | None] = {a: None for a in ATTRIBUTES}
    result["count"] = len(reading.objects) == len(want)
    if len(found) < len(want):
        found = found + [None] * (len(want) - len(found))

    def score(assign):
        checks = {"shape": all(f is not None and f.shape == w.shape for w, f in zip(want, assign)),
                  "color": all(f is not None and f.color == w.color for w, f in zip(want, assign))}
        if sample.stated.get("size"):
            checks["size"] = all(f is not None and f.size == w.size for w, f in zip(want, assign))
        if sample.stated.get("position"):
            checks["position"] = all(f is not None and (f.row, f.col) == (w.row, w.col) for w, f in zip(want, assign))
        if sample.relation:
            checks["relation"] = None not in assign and relation_holds(sample.relation, assign[0], assign[1])
        return checks

    candidates = [found] if len(want) == 1 else [found, found[::-1]]
    best = max((score(c) for c in candidates), key=lambda c: sum(c.values()))
    result.update(best)
    if sample.stated.get("background"):
        result["background"] = reading.background == sample.background
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def prompt_accuracy(samples: Sequence[ShapesSample], readings: Sequence[SceneReading]) -> dict:
    """Prompt accuracy overall, for one- and two-object prompts, and per attribute.

    Args:
        samples (`Sequence[ShapesSample]`): the prompts' scenes.
        readings (`Sequence[SceneReading]`): the readings of their images, one each.

    Returns:
        `dict`: "prompt_accuracy", "acc_one_object", "acc_two_object" (fractions, None without
        such prompts), "per_attribute" (a fraction per attribute, of the prompts that state it)
        and "n".
    """
    verdicts = [judge(s, r) for s, r in zip(samples, readings, strict=True)]

    def frac(vs, key="all"):
        vals = [v[key] for v in vs if v[key] is not None]
        return float(np.mean(vals)) if vals else None

    one = [v for s, v in zip(samples, verdicts) if len(s.objects) == 1]
    two = [v for s, v in zip(samples, verdicts) if len(s.objects) == 2]
    return {"prompt_accuracy": frac(verdicts), "acc_one_object": frac(one), "acc_two_object": frac(two),
            "per_attribute": {a: frac(verdicts, a) for a in ATTRIBUTES}, "n": len(verdicts)}


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2).

    Args:
        reference (`torch.Tensor`): the original images.
        reconstruction (`torch.Tensor`): their reconstructions, clamped to [-1, 1] first.

    Returns:
        `float`: over the whole batch.
    """
    mse = F.mse_loss(reconstruction.float().clamp(-1, 1), reference.float()).item()
    return float(10 * np.log10(4.0 / max(mse, 1e-12)))


def load_classifier(path: str | Path) -> ShapesClassifier:
    """The evaluator from a safetensors file (weights only: nothing in it can run code).

    Args:
        path (`str` or `Path`): a file `save_classifier` wrote.

    Returns:
        `ShapesClassifier`: in eval mode.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata().get("config", "{}"))
    model = ShapesClassifier(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def save_classifier(model: ShapesClassifier, path: str | Path, **meta) -> None:
    """Save the evaluator as safetensors, its architecture in the metadata.

    Args:
        model (`ShapesClassifier`): the evaluator.
        path (`str` or `Path`): the file to write.
        meta: JSON-serialisable values stored in the metadata beside the config.
    """
    from safetensors.torch import save_file

    config = {"width": model.width, "feature_dim": model.feature_dim}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": json.dumps(config), **{k: json.dumps(v) for k, v in meta.items()}})
