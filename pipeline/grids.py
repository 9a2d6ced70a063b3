"""Image grids: many uint8 images tiled into one, for the trainer's sample logs and evaluate's and
sample's grid files, with optional labels. numpy and Pillow only, below both ``pipeline.train``
and ``pipeline.release``::

    from pipeline.grids import make_grid
    grid = make_grid(images, cols=4)   # uint8 [B, H, W, 3] -> uint8 [rows*(H+2)+2, cols*(W+2)+2, 3]
    grid = make_grid(images, cols=3, col_labels=["bicubic", "sr256", "real"],
                     row_labels=["a red circle", "a blue square"])   # a header, and a text column

Column labels go in a header strip above their columns, row labels (a prompt, a seed) in a
column to the left of their rows, wrapped to its width; without labels the grid is exactly the
plain tiling. Not a script.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LABEL_WIDTH = 200  # px of the row-label column (text wraps inside it)
LINE_HEIGHT = 12  # px per text line of Pillow's default bitmap font


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2,
              col_labels: Sequence[str] | None = None, row_labels: Sequence[str] | None = None) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 grid image, row-major (by hand: torchvision's make_grid is
    not available beside this torch build). ``col_labels``: one text per column, above it;
    ``row_labels``: one text per row, left of it."""
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = img
    if not col_labels and not row_labels:
        return grid
    return _labelled(grid, h, w, pad, list(col_labels or []), list(row_labels or []))


def label_margins(w: int, pad: int = 2, col_labels: Sequence[str] | None = None,
                  row_labels: Sequence[str] | None = None) -> tuple[int, int]:
    """(top, left) px the labels add before the plain tiling of tiles ``w`` px wide."""
    head = _lines_needed(list(col_labels), w) * LINE_HEIGHT + pad if col_labels else 0
    return head, LABEL_WIDTH if row_labels else 0


def _labelled(grid: np.ndarray, h: int, w: int, pad: int, col_labels: list[str], row_labels: list[str]
              ) -> np.ndarray:
    """``grid`` with a header of column labels and a left column of row labels, in black."""
    from PIL import Image, ImageDraw

    head, side = label_margins(w, pad, col_labels, row_labels)
    canvas = Image.new("RGB", (grid.shape[1] + side, grid.shape[0] + head), "white")
    canvas.paste(Image.fromarray(grid), (side, head))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(col_labels):
        _write(draw, text, side + pad + j * (w + pad), 0, w, head)
    for i, text in enumerate(row_labels):
        _write(draw, text, 2, head + pad + i * (h + pad), side - 4, h)
    return np.asarray(canvas)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` px (6 px a character in the default font)."""
    per_line = max(1, width // 6)
    lines, line = [], ""
    for word in str(text).split():
        while len(word) > per_line:  # a word longer than the line is cut over several
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:per_line])
            word = word[per_line:]
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def _lines_needed(labels: list[str], width: int) -> int:
    return max(1, min(3, max(len(_wrap(t, width)) for t in labels)))


def _write(draw, text: str, x: int, y: int, width: int, height: int) -> None:
    """``text`` wrapped into the box; lines that do not fit its height are dropped ("..." ends it)."""
    lines = _wrap(text, width)
    fit = max(1, height // LINE_HEIGHT)
    if len(lines) > fit:
        lines = lines[:fit]
        lines[-1] = lines[-1][: max(0, width // 6 - 3)] + "..."
    for k, line in enumerate(lines):
        draw.text((x, y + k * LINE_HEIGHT), line, fill=(0, 0, 0))
