"""pipeline/grids.py: tiles land row-major, padding and empty slots stay white."""

from __future__ import annotations

import numpy as np

from pipeline.grids import make_grid


def test_make_grid_places_tiles_row_major():
    imgs = np.stack([np.full((4, 5, 3), v, np.uint8) for v in (10, 20, 30)])
    grid = make_grid(imgs, cols=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 7, 0] == 20 and grid[6, 1, 0] == 30
    assert grid[6, 7, 0] == 255 and grid[0, 0, 0] == 255  # empty slot and padding stay white
