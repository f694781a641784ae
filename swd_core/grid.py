"""Labelled image grids (rows = prompts, columns = samplers/models) for humans to look at."""

from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
               cell: int = 128, label_width: int = 220, header: int = 28, title: str | None = None) -> Image.Image:
    """Lay images out in a grid with the row label (e.g. the prompt) on the left of each row.

    Args:
        rows (`Sequence[Sequence[Image.Image]]`): one list of images per row, one image per column.
        row_labels (`Sequence[str]`): one per row, wrapped to 34 characters, at most 8 lines.
        col_labels (`Sequence[str]`): one per column, as the header.
        cell (`int`): each image's side in the grid (nearest-neighbour resizing keeps pixels sharp).
        label_width (`int`): the label column's width.
        header (`int`): the header's height (twice that with a title).
        title (`str`, *optional*): a line above the header.

    Returns:
        `Image.Image`: an RGB image.

    Raises:
        ValueError: the labels or a row's images do not match the grid's shape.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    n_cols = len(col_labels)
    font = ImageFont.load_default()
    top = header + (header if title else 0)
    grid = Image.new("RGB", (label_width + n_cols * cell, top + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((6, 8), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((label_width + c * cell + 4, top - header + 8), label, fill="black", font=font)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        if len(images) != n_cols:
            raise ValueError(f"row {r} has {len(images)} images but there are {n_cols} columns")
        y = top + r * cell
        draw.multiline_text((6, y + 6), "\n".join(textwrap.wrap(label, 34)[:8]), fill="black", font=font)
        for c, im in enumerate(images):
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (label_width + c * cell, y))
    return grid
