"""Render a grid of pointers to an RGB image.

Every cell shows a pointer to a cell (row, col). A cell is ``cell_pixels`` x ``cell_pixels``
pixels: its first row and column are a dark grid line; inside, the top band (rows 1..P/2-1) has
the colour ``PALETTE[row]`` and the bottom band (rows P/2..P-1) the colour ``PALETTE[col]``.
Cell (r, c) covers image rows ``r*P .. r*P+P-1`` and columns ``c*P .. c*P+P-1``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

GRID_LINE = (40, 40, 40)
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
)  # fmt: skip
MAX_GRID = len(PALETTE)


def cell_tile(target_row: int, target_col: int, cell_pixels: int = 8) -> np.ndarray:
    """The ``[P, P, 3]`` uint8 picture of a cell pointing at (target_row, target_col)."""
    p, half = cell_pixels, cell_pixels // 2
    tile = np.empty((p, p, 3), dtype=np.uint8)
    tile[:half] = PALETTE[target_row]
    tile[half:] = PALETTE[target_col]
    tile[0, :] = GRID_LINE
    tile[:, 0] = GRID_LINE
    return tile


@lru_cache(maxsize=8)
def _tiles(grid_size: int, cell_pixels: int) -> np.ndarray:
    g = grid_size
    return np.stack([cell_tile(i // g, i % g, cell_pixels) for i in range(g * g)])


def render_grid(pointers: np.ndarray, cell_pixels: int = 8) -> np.ndarray:
    """Render a ``[G, G]`` array of pointed-to cell indices to a ``[G*P, G*P, 3]`` uint8 image."""
    pointers = np.asarray(pointers)
    g, p = pointers.shape[0], cell_pixels
    if g > MAX_GRID:
        raise ValueError(f"grid_size={g} is too large: the palette draws at most {MAX_GRID} rows/columns")
    if p < 4:
        raise ValueError(f"cell_pixels must be at least 4, got {p}")
    tiles = _tiles(g, p)[pointers]  # [G, G, P, P, 3]
    return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, 3))
