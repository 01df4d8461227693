"""Render a grid of symbols to an RGB image.

Each cell is ``cell_pixels`` x ``cell_pixels`` pixels. Its first row and column are a dark grid
line; the rest is filled with the colour of the symbol's direction, and the symbol's distance
(1..3) is drawn as that many white horizontal bars. Cell (r, c) covers rows
``r*P .. r*P+P-1`` and columns ``c*P .. c*P+P-1``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from dstp.shiftbench.symbols import DIRECTIONS, SYMBOLS, symbol_parts

GRID_LINE = (40, 40, 40)
BAR = (255, 255, 255)
DIRECTION_COLOURS = {
    "U": (220, 50, 50),  # red
    "D": (50, 170, 60),  # green
    "L": (50, 90, 220),  # blue
    "R": (230, 200, 40),  # yellow
}
assert tuple(DIRECTION_COLOURS) == DIRECTIONS


def bar_rows(cell_pixels: int, distance: int) -> list[int]:
    """Rows (inside a cell) of the white bars that draw ``distance``."""
    return [1 + 2 * k for k in range(distance)]


def cell_tile(symbol_id: int, cell_pixels: int = 8) -> np.ndarray:
    """The ``[P, P, 3]`` uint8 picture of one cell showing ``symbol_id``."""
    direction, distance = symbol_parts(symbol_id)
    p = cell_pixels
    tile = np.empty((p, p, 3), dtype=np.uint8)
    tile[:, :] = DIRECTION_COLOURS[direction]
    tile[0, :] = GRID_LINE
    tile[:, 0] = GRID_LINE
    for row in bar_rows(p, distance):
        tile[row, 2 : p - 1] = BAR
    return tile


@lru_cache(maxsize=8)
def _tiles(cell_pixels: int) -> np.ndarray:
    return np.stack([cell_tile(s, cell_pixels) for s in range(len(SYMBOLS))])


def render_grid(symbols: np.ndarray, cell_pixels: int = 8) -> np.ndarray:
    """Render a ``[G, G]`` array of symbol ids to an ``[G*P, G*P, 3]`` uint8 image."""
    if cell_pixels < 8:
        raise ValueError(f"cell_pixels must be at least 8 to draw 3 bars, got {cell_pixels}")
    symbols = np.asarray(symbols)
    g, p = symbols.shape[0], cell_pixels
    tiles = _tiles(p)[symbols]  # [G, G, P, P, 3]
    return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, 3))
