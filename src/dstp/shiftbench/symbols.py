"""The symbols a ShiftBench cell can show: a move, direction x distance (``U1`` .. ``R3``)."""

from __future__ import annotations

DIRECTIONS = ("U", "D", "L", "R")
MAX_DISTANCE = 3
STEP = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
SYMBOLS = tuple(f"{d}{k}" for d in DIRECTIONS for k in range(1, MAX_DISTANCE + 1))


def symbol_parts(symbol_id: int) -> tuple[str, int]:
    """(direction, distance) of a symbol id."""
    name = SYMBOLS[symbol_id]
    return name[0], int(name[1:])


def apply_move(cell: tuple[int, int], symbol_id: int) -> tuple[int, int]:
    """The cell reached from ``cell`` by the move a symbol shows (no bounds check)."""
    direction, distance = symbol_parts(symbol_id)
    dr, dc = STEP[direction]
    return cell[0] + dr * distance, cell[1] + dc * distance


def cell_name(r: int, c: int) -> str:
    """Text token of cell (r, c)."""
    return f"r{r}c{c}"


def parse_cell_name(token: str) -> tuple[int, int] | None:
    """Inverse of :func:`cell_name`; None when ``token`` is not a cell name."""
    if not token.startswith("r") or "c" not in token:
        return None
    r, _, c = token[1:].partition("c")
    if not (r.isdigit() and c.isdigit()):
        return None
    return int(r), int(c)
