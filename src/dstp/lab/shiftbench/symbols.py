"""Cell names: one text token per cell, ``r{row}c{col}``; cell index = row * G + col."""

from __future__ import annotations


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
