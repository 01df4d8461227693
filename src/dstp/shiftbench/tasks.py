"""ShiftBench tasks: a seeded generator of (image, question, chain of thought, answer) samples.

Every cell of a G x G grid shows a move (direction U/D/L/R x distance 1..3) that stays inside the
grid. Cells are named by one text token each (``r3c7``); cell index = r * G + c, which is also the
index of the cell's visual token.

- ``lookup``: prompt ``<image> lookup r3c7``, target ``D2 = D2`` (what the cell shows).
- ``pair``:   prompt ``<image> pair r3c7 r9c1``, target ``r3c7 D2 r9c1 L1 = diff`` (same/diff symbol).
- ``walk``:   prompt ``<image> walk h3 r3c7``, target ``D2 r5c7 L1 r5c6 U3 r2c6 = r2c6``: starting
  at the named cell, each hop writes what the current cell shows and the cell that move leads to;
  the answer is the cell where the walk ends. The walk never visits a cell twice.

The model generates the target followed by ``<eos>``; :func:`check_answer` compares the token after
the last ``=`` with the reference answer.

Dependencies, aligned with ``target.split()``:
- ``token_dependencies[j]``: the cells whose contents decide token j given the prompt (transitive:
  in a walk, hop i depends on every cell visited before it);
- ``token_reads[j]``: the cell the model must read from the image to write token j given the
  tokens before it (the move tokens of a walk, the symbols of lookup and pair), else empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dstp.shiftbench.render import render_grid
from dstp.shiftbench.symbols import SYMBOLS, apply_move, cell_name

TASKS = ("lookup", "pair", "walk")
MIN_GRID = 4  # moves go up to 3 cells, so every cell needs a move that stays inside
MAX_HOPS = 8
DEFAULT_WALK_HOPS = range(2, 7)
IMAGE_TOKEN = "<image>"


@dataclass
class Sample:
    task: str
    image: np.ndarray  # uint8 [H, W, 3]
    prompt: str  # contains <image>
    target: str  # chain of thought + "=" + answer (without <eos>)
    answer: str
    hops: int  # walk hops; 0 for lookup and pair
    cells_needed: list[int]  # every cell the answer needs, in reading order
    token_dependencies: list[set[int]]  # per target token (target.split())
    token_reads: list[set[int]] = field(default_factory=list)
    symbols: np.ndarray | None = None  # [G, G] symbol ids (what the image shows)


def random_grid(rng: np.random.Generator, grid_size: int) -> np.ndarray:
    """[G, G] symbol ids, each drawn uniformly among the moves that stay inside the grid."""
    valid = _valid_moves(grid_size)  # [G, G, S]
    pick = np.floor(rng.random((grid_size, grid_size)) * valid.sum(-1))  # k-th valid move
    return np.argmax(np.cumsum(valid, -1) > pick[..., None], axis=-1).astype(np.int64)


def _valid_moves(g: int) -> np.ndarray:
    return np.array(
        [[[_inside(apply_move((r, c), s), g) for s in range(len(SYMBOLS))] for c in range(g)] for r in range(g)]
    )


def _inside(cell: tuple[int, int], g: int) -> bool:
    return 0 <= cell[0] < g and 0 <= cell[1] < g


def _validate(task: str, grid_size: int, hops) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown ShiftBench task {task!r}; known tasks: {', '.join(TASKS)}")
    if grid_size < MIN_GRID:
        raise ValueError(
            f"grid_size={grid_size} is too small: moves go up to 3 cells, need grid_size >= {MIN_GRID}"
        )
    if task != "walk":
        if hops is not None:
            raise ValueError(f"hops applies only to the walk task, got hops={hops!r} for {task!r}")
        return
    for h in _hop_choices(hops):
        if not 1 <= h <= MAX_HOPS:
            raise ValueError(f"walk hops must be in 1..{MAX_HOPS}, got {h}")
        if grid_size * grid_size < 2 * (h + 1):
            raise ValueError(
                f"grid_size={grid_size} is too small for walks of {h} hops: a walk visits {h + 1} "
                f"distinct cells, need grid_size**2 >= {2 * (h + 1)}"
            )


def _hop_choices(hops) -> list[int]:
    if hops is None:
        return list(DEFAULT_WALK_HOPS)
    if isinstance(hops, (int, np.integer)):
        return [int(hops)]
    choices = [int(h) for h in hops]
    if not choices:
        raise ValueError("hops is an empty range")
    return choices


def make_question(task: str, symbols: np.ndarray, rng: np.random.Generator, hops: int = 0):
    """One question about a grid: (question words, target words, answer, cells_needed, deps, reads).

    Question words exclude ``<image>``. Returns None when a walk of ``hops`` from a random start
    revisits a cell (the caller draws again).
    """
    g = symbols.shape[0]

    def sym(cell):
        return SYMBOLS[int(symbols[cell])]

    def idx(cell):
        return cell[0] * g + cell[1]

    def name(cell):
        return cell_name(*cell)

    start = (int(rng.integers(g)), int(rng.integers(g)))
    if task == "lookup":
        s = sym(start)
        needed = [idx(start)]
        return ["lookup", name(start)], [s, "=", s], s, needed, [{idx(start)}, set(), {idx(start)}], [
            {idx(start)},
            set(),
            set(),
        ]
    if task == "pair":
        a = start
        if rng.random() < 0.5:
            same = [(r, c) for r in range(g) for c in range(g) if symbols[r, c] == symbols[a] and (r, c) != a]
            b = same[rng.integers(len(same))] if same else None
        else:
            b = None
        while b is None or b == a:
            b = (int(rng.integers(g)), int(rng.integers(g)))
        ans = "same" if symbols[a] == symbols[b] else "diff"
        ia, ib = idx(a), idx(b)
        target = [name(a), sym(a), name(b), sym(b), "=", ans]
        deps = [set(), {ia}, set(), {ib}, set(), {ia, ib}]
        reads = [set(), {ia}, set(), {ib}, set(), set()]
        return ["pair", name(a), name(b)], target, ans, [ia, ib], deps, reads
    # walk
    cells = [start]
    for _ in range(hops):
        nxt = apply_move(cells[-1], int(symbols[cells[-1]]))
        if nxt in cells:
            return None
        cells.append(nxt)
    target, deps, reads = [], [], []
    for i in range(hops):
        seen = {idx(c) for c in cells[: i + 1]}
        target += [sym(cells[i]), name(cells[i + 1])]
        deps += [set(seen), set(seen)]
        reads += [{idx(cells[i])}, set()]
    answer = name(cells[-1])
    target += ["=", answer]
    all_seen = {idx(c) for c in cells[:-1]}
    deps += [set(), set(all_seen)]
    reads += [set(), set()]
    needed = [idx(c) for c in cells[:-1]]
    return ["walk", f"h{hops}", name(start)], target, answer, needed, deps, reads


def generate_samples(task: str, n: int, seed: int, grid_size: int = 12, hops=None, cell_pixels: int = 8):
    """``n`` samples of ``task``, a pure function of the arguments.

    ``hops`` (walk only): None draws uniformly from 2..6, an int fixes it, a range/list draws from it.
    """
    _validate(task, grid_size, hops)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    hop_choices = _hop_choices(hops) if task == "walk" else [0]
    rng = np.random.default_rng([int(seed), TASKS.index(task), grid_size])
    samples = []
    while len(samples) < n:
        symbols = random_grid(rng, grid_size)
        h = hop_choices[int(rng.integers(len(hop_choices)))]
        q = None
        for _ in range(200):
            q = make_question(task, symbols, rng, h)
            if q is not None:
                break
        if q is None:
            continue  # this grid has no such walk: draw another grid
        question, target, answer, needed, deps, reads = q
        samples.append(
            Sample(
                task=task,
                image=render_grid(symbols, cell_pixels),
                prompt=" ".join([IMAGE_TOKEN] + question),
                target=" ".join(target),
                answer=answer,
                hops=h,
                cells_needed=needed,
                token_dependencies=deps,
                token_reads=reads,
                symbols=symbols,
            )
        )
    return samples


def parse_answer(generated_text: str) -> str | None:
    """The token after the last ``=`` of a generated chain of thought (None if there is none)."""
    words = generated_text.replace("<eos>", " <eos> ").split()
    if "<eos>" in words:
        words = words[: words.index("<eos>")]
    if "=" not in words:
        return None
    last = len(words) - 1 - words[::-1].index("=")
    return words[last + 1] if last + 1 < len(words) else None


def check_answer(sample: Sample, generated_text: str) -> bool:
    """Exact match of the final answer (after the chain of thought) with the reference."""
    return parse_answer(generated_text) == sample.answer

