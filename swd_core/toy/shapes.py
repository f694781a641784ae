"""shapes: a procedural text-to-image dataset, deterministic from a seed.

64×64 RGB images of one or two flat-coloured objects on a plain background. Objects sit in the
cells of a 3×3 grid (a small jitter keeps images varied). Each sample carries its caption and
the structured attributes behind it; captions only state some attributes, and the evaluator
checks exactly the stated ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225),
    "yellow": (235, 205, 30), "purple": (150, 60, 190), "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25)}
SIZES = {"small": 6, "large": 10}  # half-extent in pixels
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
CELL = IMAGE_SIZE / 3
POSITIONS = {  # (row, col) -> phrase
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# (colour, shape) pairs never drawn in training; the held-out prompts use them (compositional generalisation).
HELD_OUT_PAIRS = (("purple", "triangle"), ("orange", "cross"))
MAX_CAPTION_TOKENS = 20  # words + <bos>/<eos>; the longest caption template fits


@dataclass
class ShapeObject:
    """One object of a scene.

    Args:
        shape (`str`): one of `SHAPES`.
        color (`str`): a key of `COLORS`.
        size (`str`): a key of `SIZES`.
        row (`int`), col (`int`): its cell of the 3×3 grid, 0 at the top left.
    """

    shape: str
    color: str
    size: str
    row: int
    col: int


@dataclass
class ShapesSample:
    """What an image shows (`objects`, `background`) and what its caption states (`stated`).

    Args:
        caption (`str`): the prompt.
        objects (`list[ShapeObject]`): one or two.
        background (`str`): a key of `BACKGROUNDS`.
        relation (`str`, *optional*): for two objects, a key of `RELATIONS` holding between them.
        stated (`dict`): attribute -> True when the caption states it.
    """

    caption: str
    objects: list[ShapeObject]
    background: str
    relation: str | None = None  # for two objects: objects[0] <relation> objects[1]
    stated: dict = field(default_factory=dict)  # attribute -> True when the caption states it
    # shape and colour are always stated; size, position and background only sometimes

    def to_dict(self) -> dict:
        """The sample as plain JSON-serialisable data; `from_dict` reads it back."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ShapesSample":
        """The sample `to_dict` wrote.

        Args:
            d (`dict`): `to_dict`'s output (`relation` and `stated` may be missing).

        Returns:
            `ShapesSample`
        """
        return ShapesSample(d["caption"], [ShapeObject(**o) for o in d["objects"]], d["background"],
                            d.get("relation"), d.get("stated", {}))


def relation_holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Whether `a` is `relation` `b` on the grid (strictly: another column or row).

    Args:
        relation (`str`): a key of `RELATIONS`.
        a (`ShapeObject`), b (`ShapeObject`): the two objects.

    Returns:
        `bool`
    """
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def vocabulary() -> list[str]:
    """Every word a caption can contain, so a word-level tokenizer needs no `<unk>`.

    Returns:
        `list[str]`: sorted.
    """
    words = set("a an one the of on in at to background".split())
    for phrases in (POSITIONS.values(), RELATIONS.values()):
        for p in phrases:
            words.update(p.split())
    words.update(SHAPES, COLORS, BACKGROUNDS, *SIZE_WORDS.values())
    return sorted(words)


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, cx: float, cy: float, scale: float) -> None:
    r, fill = SIZES[obj.size] * scale, COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif obj.shape == "triangle":
        half = r * 0.95
        draw.polygon([(cx, cy - r), (cx + half, cy + r * 0.8), (cx - half, cy + r * 0.8)], fill=fill)
    elif obj.shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; allowed: {SHAPES}")


SUPERSAMPLE = 4


def render(sample: ShapesSample, rng: np.random.Generator | None = None, jitter: int = 2) -> Image.Image:
    """Draw a sample, supersampled then box-downsampled for smooth edges.

    Args:
        sample (`ShapesSample`): the scene.
        rng (`np.random.Generator`, *optional*): draws a position jitter per object; None: none.
        jitter (`int`): the largest jitter, in pixels, either way on each axis.

    Returns:
        `Image.Image`: IMAGE_SIZE × IMAGE_SIZE RGB.
    """
    k = SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUNDS[sample.background])
    draw = ImageDraw.Draw(img)
    for obj in sample.objects:
        dx, dy = rng.integers(-jitter, jitter + 1, size=2) if rng is not None and jitter else (0, 0)
        _draw(draw, obj, ((obj.col + 0.5) * CELL + dx) * k, ((obj.row + 0.5) * CELL + dy) * k, k)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _random_object(rng, row, col, allow_held_out: bool) -> ShapeObject:
    while True:
        color, shape = _pick(rng, COLORS), _pick(rng, SHAPES)
        if allow_held_out or (color, shape) not in HELD_OUT_PAIRS:
            return ShapeObject(shape, color, _pick(rng, SIZES), row, col)


def _noun_phrase(rng, obj: ShapeObject, with_size: bool) -> str:
    size = f"{_pick(rng, SIZE_WORDS[obj.size])} " if with_size else ""
    return f"{size}{obj.color} {obj.shape}"


def _article(rng) -> str:
    return _pick(rng, ("a", "a", "one"))


def sample_attributes(rng: np.random.Generator, two_objects: bool | None = None,
                      allow_held_out: bool = False) -> ShapesSample:
    """Draw a random scene and a caption stating some of its attributes.

    Args:
        rng (`np.random.Generator`): the only source of randomness.
        two_objects (`bool`, *optional*): one or two objects; None draws it (even odds).
        allow_held_out (`bool`): allow the (colour, shape) pairs of `HELD_OUT_PAIRS`.

    Returns:
        `ShapesSample`
    """
    if two_objects is None:
        two_objects = rng.random() < 0.5
    background = _pick(rng, BACKGROUNDS)
    say_background = rng.random() < 0.5
    bg_phrase = f" on a {background} background" if say_background else ""
    if not two_objects:
        row, col = _pick(rng, POSITIONS)
        obj = _random_object(rng, row, col, allow_held_out)
        say_size, say_position = rng.random() < 0.7, rng.random() < 0.7
        pos = f" {POSITIONS[(row, col)]}" if say_position else ""
        caption = f"{_article(rng)} {_noun_phrase(rng, obj, say_size)}{pos}{bg_phrase}"
        stated = {"size": say_size, "position": say_position, "background": say_background}
        return ShapesSample(caption, [obj], background, None, stated)
    relation = _pick(rng, RELATIONS)
    cells = [(a, b) for a in POSITIONS for b in POSITIONS if a != b]
    pairs = [(a, b) for a, b in cells
             if relation_holds(relation, ShapeObject("", "", "", *a), ShapeObject("", "", "", *b))]
    (ra, ca), (rb, cb) = _pick(rng, pairs)
    first = _random_object(rng, ra, ca, allow_held_out)
    second = _random_object(rng, rb, cb, allow_held_out)
    say_size = rng.random() < 0.4
    caption = (f"{_article(rng)} {_noun_phrase(rng, first, say_size)} {RELATIONS[relation]} "
               f"a {_noun_phrase(rng, second, say_size)}{bg_phrase}")
    stated = {"size": say_size, "position": False, "background": say_background}
    return ShapesSample(caption, [first, second], background, relation, stated)


def dataset(seed: int, count: int, start: int = 0):
    """Training samples, each drawn from its own generator so sample i depends only on (seed, i).

    Args:
        seed (`int`): the dataset's seed.
        count (`int`): how many.
        start (`int`): the first index.

    Returns:
        `Iterator[tuple[int, ShapesSample, Image.Image]]`: (index, sample, rendered image).
    """
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        sample = sample_attributes(rng)
        yield i, sample, render(sample, rng)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Scale 8-bit pixels to the range the VAE and the classifier read.

    Args:
        pixels (`torch.Tensor`): uint8, (B, 3, H, W).

    Returns:
        `torch.Tensor`: float32 in [-1, 1].
    """
    return pixels.float() / 127.5 - 1.0


def to_tensor(images) -> torch.Tensor:
    """Stack PIL images into a batch.

    Args:
        images (`Iterable[Image.Image]`): of one size.

    Returns:
        `torch.Tensor`: (B, 3, H, W) float32 in [-1, 1].
    """
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return from_uint8(torch.from_numpy(arr).permute(0, 3, 1, 2))


EVAL_SEED = 20_251_125
VALIDATION_SEED = 20_261_126


def held_out_prompts(count: int = 640, seed: int = EVAL_SEED,
                     exclude: frozenset[str] = frozenset()) -> list[ShapesSample]:
    """The fixed evaluation set: half one-object, half two-object prompts; a fifth of them use
    (colour, shape) pairs never drawn in training. Deterministic; never used for training.

    Args:
        count (`int`): how many prompts.
        seed (`int`): the set's seed.
        exclude (`frozenset[str]`): captions to skip; every caption in the set is distinct, too.

    Returns:
        `list[ShapesSample]`: alternating one- and two-object prompts.
    """
    out, rng = [], np.random.default_rng(seed)
    seen = set(exclude)
    while len(out) < count:
        two = len(out) % 2 == 1
        unseen = len(out) % 5 == 0
        s = sample_attributes(rng, two_objects=two, allow_held_out=unseen)
        has_held_out = any((o.color, o.shape) in HELD_OUT_PAIRS for o in s.objects)
        if unseen != has_held_out or s.caption in seen:
            continue
        seen.add(s.caption)
        out.append(s)
    return out


def validation_prompts(count: int) -> list[ShapesSample]:
    """Prompts for choosing a checkpoint while training (`distill.validation`): drawn like the
    evaluation set from another seed and never one of its captions, so the evaluate stage scores
    the chosen student on prompts the choice never saw.

    Args:
        count (`int`): how many prompts.

    Returns:
        `list[ShapesSample]`
    """
    return held_out_prompts(count, VALIDATION_SEED, exclude=frozenset(s.caption for s in held_out_prompts()))
