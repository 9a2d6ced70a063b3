"""pipeline/grids.py: tiles land row-major, padding and empty slots stay white; labels add a
header and a text column around the same tiling."""

from __future__ import annotations

import numpy as np

from pipeline.grids import make_grid


def test_make_grid_places_tiles_row_major():
    imgs = np.stack([np.full((4, 5, 3), v, np.uint8) for v in (10, 20, 30)])
    grid = make_grid(imgs, cols=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 7, 0] == 20 and grid[6, 1, 0] == 30
    assert grid[6, 7, 0] == 255 and grid[0, 0, 0] == 255  # empty slot and padding stay white


def test_labels_frame_the_same_tiles_with_text_above_and_left():
    from pipeline.grids import label_margins

    imgs = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (10, 20, 30, 40)])
    plain = make_grid(imgs, cols=2)
    labelled = make_grid(imgs, cols=2, col_labels=["circle", "square"], row_labels=["red", "a blue square"])
    top, left = label_margins(32, 2, ["circle", "square"], ["red", "a blue square"])
    assert top > 0 and left > 0
    assert labelled.shape == (plain.shape[0] + top, plain.shape[1] + left, 3)
    np.testing.assert_array_equal(labelled[top:, left:], plain)  # the tiles are where they were
    header, side = labelled[:top, left:], labelled[top:, :left]
    assert (header < 128).any() and (side < 128).any()  # black text in both margins
    assert (labelled[:top, :left] == 255).all()  # the corner stays white
    only_rows = make_grid(imgs, cols=2, row_labels=["red", "blue"])
    assert only_rows.shape == (plain.shape[0], plain.shape[1] + left, 3)
