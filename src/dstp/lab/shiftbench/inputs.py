"""What the ShiftBench processor accepts: prompts in the testbed's language and images that are its renders.

Language (what `tasks.generate_samples` writes and the model was trained on)::

    prompt   = "<image>" question [answer words]
    question = "lookup" CELL | "pair" CELL CELL | "walk" HOPS CELL
    CELL     = r<row>c<col> inside the grid        HOPS = h<n>, n in 1..max_hops

Answer words (cells, ``=``, ``same``, ``diff``, then ``<eos>``) may follow, for teacher-forced scoring.
Images: H x W x 3 RGB of exactly the render's size, uint8 (or float in [0, 1]), whose cells show the render's grid
lines and palette colours. Every check raises `InputError` naming what is wrong.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from dstp.errors import InputError
from dstp.lab.shiftbench.render import GRID_LINE, PALETTE
from dstp.lab.shiftbench.symbols import cell_name, parse_cell_name
from dstp.lab.shiftbench.tasks import IMAGE_TOKEN, MAX_HOPS

ARGUMENTS = {"lookup": ("CELL",), "pair": ("CELL", "CELL"), "walk": ("HOPS", "CELL")}
ANSWER_WORDS = ("=", "same", "diff")
EOS = "<eos>"
FORMS = "`<image> lookup CELL`, `<image> pair CELL CELL` or `<image> walk hN CELL`"
# how far (RGB distance) a render's colours may drift and still count as the render. JPEG at quality 95 drifts
# 66 and drops the shipped model's walk accuracy from 1.00 to 0.66 (100 walks), so it is rejected.
COLOUR_TOLERANCE = 40.0
NOT_A_RENDER = "is not a ShiftBench render (lossy formats such as JPEG alter one; use the PNG renders)"


# ---- prompts ---------------------------------------------------------------------------------------
def check_prompt(prompt, grid_size: int, max_hops: int | None = None, vocabulary=None, where: str = "prompt") -> None:
    """Raise InputError unless `prompt` is a ShiftBench question (optionally followed by answer words)."""
    if not isinstance(prompt, str):
        raise InputError(f"{where} must be a string, got {type(prompt).__name__}")
    words = prompt.split()
    shown = f"{where} {prompt!r}"
    if words.count(IMAGE_TOKEN) != 1:
        raise InputError(f"{shown} needs exactly one {IMAGE_TOKEN}, found {words.count(IMAGE_TOKEN)}")
    for w in words:
        _check_word(w, grid_size, max_hops or MAX_HOPS, vocabulary, shown)
    if words[0] != IMAGE_TOKEN:
        raise InputError(f"{shown} must start with {IMAGE_TOKEN}: ShiftBench prompts are {FORMS}")
    _check_question(words[1:], shown)


def _check_word(word: str, grid_size: int, max_hops: int, vocabulary, shown: str) -> None:
    cell = parse_cell_name(word)
    if cell is not None:
        r, c = cell
        if r >= grid_size or c >= grid_size:
            raise InputError(f"cell {word} in {shown} is outside the {grid_size}x{grid_size} grid "
                             f"(rows and columns 0..{grid_size - 1})")
        if word != cell_name(r, c):
            raise InputError(f"unknown word {word!r} in {shown}: cells are written {cell_name(r, c)}")
        return
    hops = re.fullmatch(r"h(\d+)", word)
    if hops is not None and not 1 <= int(hops.group(1)) <= max_hops:
        raise InputError(f"{word} in {shown}: this model was built for walks of 1..{max_hops} hops (h1..h{max_hops})")
    if vocabulary is not None and word not in vocabulary:
        raise InputError(f"unknown word {word!r} in {shown}: ShiftBench prompts are {FORMS} "
                         f"(CELL: r0c0..r{grid_size - 1}c{grid_size - 1})")


def _check_question(words: list[str], shown: str) -> None:
    if not words or words[0] not in ARGUMENTS:
        got = repr(words[0]) if words else "nothing"
        raise InputError(f"{shown} asks {got} after {IMAGE_TOKEN}: ShiftBench prompts are {FORMS}")
    task, expected = words[0], ARGUMENTS[words[0]]
    given = words[1:1 + len(expected)]
    if len(given) < len(expected) or not all(map(_is_kind, given, expected)):
        raise InputError(f"{shown}: {task} takes {' '.join(expected)} (e.g. {_example(task)}), got "
                         f"{' '.join(given) or 'nothing'}")
    _check_answer_words(words[1 + len(expected):], shown)


def _is_kind(word: str, kind: str) -> bool:
    if kind == "CELL":
        return parse_cell_name(word) is not None
    return re.fullmatch(r"h\d+", word) is not None


def _example(task: str) -> str:
    return {"lookup": "`<image> lookup r3c7`", "pair": "`<image> pair r3c7 r9c1`", "walk": "`<image> walk h3 r3c7`"}[task]


def _check_answer_words(words: list[str], shown: str) -> None:
    for i, w in enumerate(words):
        if w == EOS and i == len(words) - 1:
            return
        if parse_cell_name(w) is None and w not in ANSWER_WORDS:
            raise InputError(f"{shown} continues with {w!r} after the question; only answer words (cells, "
                             f"{', '.join(ANSWER_WORDS)}, a final {EOS}) may follow it")


# ---- images ----------------------------------------------------------------------------------------
def image_array(image, grid_size: int, cell_pixels: int, where: str = "image") -> np.ndarray:
    """The image as an H x W x 3 uint8 array, if it is a ShiftBench render (else InputError)."""
    array = _rgb_array(image, where)
    side = grid_size * cell_pixels
    if array.shape[:2] != (side, side):
        raise InputError(f"{where} is {array.shape[1]}x{array.shape[0]} pixels; ShiftBench renders are "
                         f"{side}x{side} (a {grid_size}x{grid_size} grid of {cell_pixels}-pixel cells)")
    _check_render(array, grid_size, cell_pixels, where)
    return array


def _rgb_array(image, where: str) -> np.ndarray:
    if isinstance(image, Image.Image) and image.mode != "RGB":
        raise InputError(f"{where} has mode {image.mode!r}; ShiftBench renders are RGB "
                         "(convert it: image.convert('RGB'))")
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    if image is None:
        raise InputError(f"{where} is missing (None)")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InputError(f"{where} has shape {tuple(array.shape)}; ShiftBench takes height x width x 3 (RGB, "
                         "channels last)")
    return _to_uint8(array, where)


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{where} has NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise InputError(f"{where} is {array.dtype} with values in [{array.min():g}, {array.max():g}]; "
                             "float images must lie in [0, 1] (pass uint8 for 0..255)")
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"{where} is {array.dtype} with values in [{array.min()}, {array.max()}]; "
                             "integer images must lie in 0..255")
        return array.astype(np.uint8)
    raise InputError(f"{where} has dtype {array.dtype}; ShiftBench takes uint8 (0..255) or float (0..1) images")


def _check_render(array: np.ndarray, grid_size: int, cell_pixels: int, where: str) -> None:
    lines = np.concatenate([array[::cell_pixels].reshape(-1, 3), array[:, ::cell_pixels].reshape(-1, 3)])
    if np.abs(lines.astype(float) - GRID_LINE).mean() > COLOUR_TOLERANCE / 2:
        raise InputError(f"{where} {NOT_A_RENDER}: the first pixel row and column of each "
                         f"{cell_pixels}x{cell_pixels} cell should be the grid colour {GRID_LINE}")
    _, distance = _nearest_palette(array, grid_size, cell_pixels)
    if distance.max() > COLOUR_TOLERANCE:
        r, c = np.unravel_index(int(distance.argmax()) % grid_size**2, (grid_size, grid_size))
        raise InputError(f"{where} {NOT_A_RENDER}: cell {cell_name(int(r), int(c))} shows a colour that names no "
                         f"row or column of a {grid_size}x{grid_size} grid")


def _band_colours(array: np.ndarray, grid_size: int, cell_pixels: int) -> np.ndarray:
    """[2, G, G, 3] mean colour of each cell's top band (pointed-to row) and bottom band (pointed-to column)."""
    g, p, half = grid_size, cell_pixels, cell_pixels // 2
    cells = array.reshape(g, p, g, p, 3).astype(float)
    top = cells[:, 1:half, :, 1:].mean(axis=(1, 3))
    bottom = cells[:, half:, :, 1:].mean(axis=(1, 3))
    return np.stack([top, bottom])


def _nearest_palette(array: np.ndarray, grid_size: int, cell_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per band: the index of the nearest of the grid's palette colours, and the RGB distance to it."""
    palette = np.asarray(PALETTE[:grid_size], dtype=float)
    d = np.linalg.norm(_band_colours(array, grid_size, cell_pixels)[..., None, :] - palette, axis=-1)
    return d.argmin(-1), d.min(-1)


def read_pointers(image, grid_size: int = 12, cell_pixels: int = 8) -> np.ndarray:
    """The [G, G] cell indices a render shows (the inverse of `render.render_grid`)."""
    array = image_array(image, grid_size, cell_pixels)
    (rows, cols), _ = _nearest_palette(array, grid_size, cell_pixels)
    return rows * grid_size + cols


def cells_needed(prompt: str, pointers: np.ndarray) -> list[int]:
    """The cells a ShiftBench question needs read, in reading order (as `Sample.cells_needed`)."""
    grid_size = pointers.shape[0]
    check_prompt(prompt, grid_size)
    words = prompt.split()
    task = words[1]
    named = [r * grid_size + c for r, c in (parse_cell_name(w) for w in words[2:2 + len(ARGUMENTS[task])]
                                              if parse_cell_name(w) is not None)]
    if task != "walk":
        return named
    cells, flat = named, pointers.reshape(-1)
    for _ in range(int(words[2][1:]) - 1):
        cells.append(int(flat[cells[-1]]))
    return cells


def relevant_cells(prompt: str, image, grid_size: int = 12, cell_pixels: int = 8) -> list[int]:
    """What `--prune oracle` keeps for one ShiftBench image and question: the cells its answer needs."""
    return cells_needed(prompt, read_pointers(image, grid_size, cell_pixels))


def relevant_mask(images, prompts, grid_size: int = 12, cell_pixels: int = 8):
    """`relevant=` for `Pipeline.generate` with the oracle pruner: [B, G*G] bool, the cells each answer needs."""
    mask = torch.zeros(len(prompts), grid_size * grid_size, dtype=torch.bool)
    for b, (image, prompt) in enumerate(zip(images, prompts)):
        mask[b, relevant_cells(prompt, image, grid_size, cell_pixels)] = True
    return mask
