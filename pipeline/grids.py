"""Image grids: many uint8 images tiled into one, for the trainer's sample logs and evaluate's and
sample's grid files. numpy only, below both ``pipeline.train`` and ``pipeline.release``::

    from pipeline.grids import make_grid
    grid = make_grid(images, cols=4)   # uint8 [B, H, W, 3] -> uint8 [rows*(H+2)+2, cols*(W+2)+2, 3]

Not a script.
"""

from __future__ import annotations

import numpy as np


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 grid image (by hand: torchvision's make_grid is not
    available beside this torch build, and this is ten lines)."""
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = img
    return grid
