"""ShiftBench tasks: a seeded generator of (image, question, chain of thought, answer) samples.

Every cell of a G x G grid shows a pointer to another cell (drawn as two colour bands: the
pointed-to row and column, see ``render.py``). Cells are named by one text token each (``r3c7``);
cell index = r * G + c, which is also the index of the cell's visual token.

- ``lookup``: prompt ``<image> lookup r3c7``, target ``r9c1 = r9c1`` (where the cell points).
- ``pair``:   prompt ``<image> pair r3c7 r9c1``, target ``r5c5 r0c4 = diff``: the second cell's
  pointer, the first cell's pointer, then whether they point at the same cell (``same``) or not
  (``diff``). (Writing the cell names again before each pointer, as a first design did, left the
  model unable to copy the names: 68% on pair.)
- ``walk``:   prompt ``<image> walk h3 r3c7``, target ``r9c1 r2c2 r6c0 = r6c0``: follow the pointers
  from the named cell for h hops, writing each visited cell; the answer is where the walk ends.
  Which cells a walk needs cannot be known before it is under way. A walk never revisits a cell.

The model generates the target followed by ``<eos>``; :func:`check_answer` compares the token after
the last ``=`` with the reference answer.

Dependencies, aligned with ``target.split()``:
- ``token_dependencies[j]``: the cells whose contents decide token j given the prompt (transitive:
  in a walk, hop i depends on every cell visited before it);
- ``token_reads[j]``: the cell the model must read from the image to write token j given the
  tokens before it (each pointer written), else empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dstp.errors import ConfigError
from dstp.lab.shiftbench.render import MAX_GRID, render_grid
from dstp.lab.shiftbench.symbols import cell_name

TASKS = ("lookup", "pair", "walk")
MIN_GRID = 2
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
    pointers: np.ndarray | None = None  # [G, G] index of the cell each cell points at (what the image shows)


def random_grid(rng: np.random.Generator, grid_size: int) -> np.ndarray:
    """[G, G] cell indices: each cell points at a uniformly drawn other cell."""
    n = grid_size * grid_size
    pointers = rng.integers(n - 1, size=n)
    pointers += pointers >= np.arange(n)  # skip the cell itself
    return pointers.reshape(grid_size, grid_size)


def _validate(task: str, grid_size: int, hops) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown ShiftBench task {task!r}; known tasks: {', '.join(TASKS)}")
    if grid_size < MIN_GRID:
        raise ConfigError(f"grid_size={grid_size} is too small: need grid_size >= {MIN_GRID}")
    if grid_size > MAX_GRID:
        raise ConfigError(f"grid_size={grid_size} is too large: the renderer draws at most {MAX_GRID}")
    if task != "walk":
        if hops is not None:
            raise ConfigError(f"hops applies only to the walk task, got hops={hops!r} for {task!r}")
        return
    for h in _hop_choices(hops):
        if not 1 <= h <= MAX_HOPS:
            raise ConfigError(f"walk hops must be in 1..{MAX_HOPS}, got {h}")
        if grid_size * grid_size < 2 * (h + 1):
            raise ConfigError(
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
        raise ConfigError("hops is an empty range")
    return choices


def make_question(task: str, pointers: np.ndarray, rng: np.random.Generator, hops: int = 0):
    """One question about a grid: (question words, target words, answer, cells_needed, deps, reads).

    Question words exclude ``<image>``. Returns None when a walk of ``hops`` from a random start
    revisits a cell (the caller draws again).
    """
    g = pointers.shape[0]
    flat = pointers.reshape(-1)

    def name(i):
        return cell_name(int(i) // g, int(i) % g)

    start = int(rng.integers(g * g))
    if task == "lookup":
        p = name(flat[start])
        return ["lookup", name(start)], [p, "=", p], p, [start], [{start}, set(), {start}], [{start}, set(), set()]
    if task == "pair":
        a, b = start, None
        if rng.random() < 0.5:
            same = np.flatnonzero(flat == flat[a])
            same = same[same != a]
            b = int(same[rng.integers(len(same))]) if len(same) else None
        while b is None or b == a:
            b = int(rng.integers(g * g))
        ans = "same" if flat[a] == flat[b] else "diff"
        target = [name(flat[b]), name(flat[a]), "=", ans]
        deps = [{b}, {a}, set(), {a, b}]
        reads = [{b}, {a}, set(), set()]
        return ["pair", name(a), name(b)], target, ans, [a, b], deps, reads
    # walk
    cells = [start]
    for _ in range(hops):
        nxt = int(flat[cells[-1]])
        if nxt in cells:
            return None
        cells.append(nxt)
    target = [name(c) for c in cells[1:]] + ["=", name(cells[-1])]
    deps = [set(cells[: i + 1]) for i in range(hops)] + [set(), set(cells[:-1])]
    reads = [{cells[i]} for i in range(hops)] + [set(), set()]
    return ["walk", f"h{hops}", name(start)], target, name(cells[-1]), cells[:-1], deps, reads


def generate_samples(task: str, n: int, seed: int, grid_size: int = 12, hops=None, cell_pixels: int = 8):
    """``n`` samples of ``task``, a pure function of the arguments.

    ``hops`` (walk only): None draws uniformly from 2..6, an int fixes it, a range/list draws from it.
    """
    _validate(task, grid_size, hops)
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    hop_choices = _hop_choices(hops) if task == "walk" else [0]
    rng = np.random.default_rng([int(seed), TASKS.index(task), grid_size])
    samples = []
    while len(samples) < n:
        pointers = random_grid(rng, grid_size)
        h = hop_choices[int(rng.integers(len(hop_choices)))]
        q = None
        for _ in range(200):
            q = make_question(task, pointers, rng, h)
            if q is not None:
                break
        if q is None:
            continue  # this grid has no such walk: draw another grid
        question, target, answer, needed, deps, reads = q
        samples.append(
            Sample(
                task=task,
                image=render_grid(pointers, cell_pixels),
                prompt=" ".join([IMAGE_TOKEN] + question),
                target=" ".join(target),
                answer=answer,
                hops=h,
                cells_needed=needed,
                token_dependencies=deps,
                token_reads=reads,
                pointers=pointers,
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

