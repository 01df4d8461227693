"""ShiftBench: generator, renderer, answer checker, dependency sets, processor, shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dstp.shiftbench import TASKS, check_answer, default_checkpoint_dir, evaluate, generate_samples, load_shiftbench
from dstp.shiftbench.processor import ShiftBenchProcessor
from dstp.shiftbench.render import BAR, DIRECTION_COLOURS, GRID_LINE, render_grid
from dstp.shiftbench.symbols import SYMBOLS, apply_move, cell_name, parse_cell_name


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_shiftbench()


@pytest.mark.parametrize("task", TASKS)
def test_generator_is_deterministic(task):
    a = generate_samples(task, 5, seed=11)
    b = generate_samples(task, 5, seed=11)
    c = generate_samples(task, 5, seed=12)
    for x, y in zip(a, b):
        assert x.prompt == y.prompt and x.target == y.target and x.answer == y.answer
        assert np.array_equal(x.image, y.image)
        assert x.token_dependencies == y.token_dependencies
    assert [x.prompt for x in a] != [x.prompt for x in c]


def test_grid_is_at_least_12x12_and_image_matches():
    s = generate_samples("walk", 1, seed=0)[0]
    assert s.symbols.shape == (12, 12)
    assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
    assert np.array_equal(render_grid(s.symbols), s.image)


def test_renderer_pixels_of_a_cell():
    p = 8
    symbols = np.zeros((4, 4), dtype=np.int64)
    symbols[2, 1] = SYMBOLS.index("L3")
    symbols[0, 3] = SYMBOLS.index("D1")
    image = render_grid(symbols, p)
    cell = image[2 * p : 3 * p, 1 * p : 2 * p]
    assert tuple(cell[0, 4]) == GRID_LINE and tuple(cell[4, 0]) == GRID_LINE
    assert tuple(cell[2, 4]) == DIRECTION_COLOURS["L"]  # between bars
    for row in (1, 3, 5):  # three bars for distance 3
        assert tuple(cell[row, 4]) == BAR
    assert tuple(cell[7, 4]) == DIRECTION_COLOURS["L"]
    other = image[0:p, 3 * p : 4 * p]
    assert tuple(other[1, 4]) == BAR and tuple(other[3, 4]) == DIRECTION_COLOURS["D"]  # one bar only
    # a cell's pixels depend on that cell's symbol only
    changed = symbols.copy()
    changed[2, 1] = SYMBOLS.index("R1")
    diff = np.any(render_grid(changed, p) != image, axis=-1)
    rows, cols = np.nonzero(diff)
    assert rows.min() >= 2 * p and rows.max() < 3 * p and cols.min() >= p and cols.max() < 2 * p


def test_answer_checker():
    s = generate_samples("walk", 1, seed=3, hops=3)[0]
    assert check_answer(s, s.target)
    assert check_answer(s, s.target + " <eos> junk = r0c0")  # stops at <eos>
    wrong = "r0c0" if s.answer != "r0c0" else "r1c1"
    assert not check_answer(s, s.target.rsplit(" ", 1)[0] + " " + wrong)
    assert not check_answer(s, s.target.split("=")[0])  # no answer after the chain of thought
    assert not check_answer(s, "")
    lk = generate_samples("lookup", 1, seed=3)[0]
    assert check_answer(lk, f"{lk.answer} = {lk.answer}")


def test_walk_dependencies_follow_the_grid():
    for s in generate_samples("walk", 20, seed=5, hops=range(2, 7)):
        g = s.symbols.shape[0]
        words = s.target.split()
        start = parse_cell_name(s.prompt.split()[-1])
        cells = [start]
        for _ in range(s.hops):
            cells.append(apply_move(cells[-1], int(s.symbols[cells[-1]])))
        index = [r * g + c for r, c in cells]
        assert len(set(index)) == s.hops + 1  # no cell visited twice
        assert s.cells_needed == index[:-1]
        assert s.answer == cell_name(*cells[-1]) == words[-1] and words[-2] == "="
        assert len(words) == len(s.token_dependencies) == len(s.token_reads) == 2 * s.hops + 2
        for i in range(s.hops):
            assert words[2 * i] == SYMBOLS[int(s.symbols[cells[i]])]
            assert words[2 * i + 1] == cell_name(*cells[i + 1])
            assert s.token_reads[2 * i] == {index[i]}
            assert s.token_dependencies[2 * i] == set(index[: i + 1])
        assert s.token_dependencies[-1] == set(index[:-1])


def test_lookup_and_pair_dependencies():
    for s in generate_samples("lookup", 10, seed=1):
        r, c = parse_cell_name(s.prompt.split()[-1])
        assert s.cells_needed == [r * 12 + c]
        assert s.answer == SYMBOLS[int(s.symbols[r, c])]
        assert s.token_dependencies[-1] == {r * 12 + c}
    answers = set()
    for s in generate_samples("pair", 40, seed=1):
        (ra, ca), (rb, cb) = (parse_cell_name(w) for w in s.prompt.split()[-2:])
        assert s.cells_needed == [ra * 12 + ca, rb * 12 + cb]
        same = s.symbols[ra, ca] == s.symbols[rb, cb]
        assert s.answer == ("same" if same else "diff")
        assert s.token_dependencies[-1] == set(s.cells_needed)
        answers.add(s.answer)
    assert answers == {"same", "diff"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown ShiftBench task 'count'.*lookup, pair, walk"):
        generate_samples("count", 1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        generate_samples("lookup", 1, seed=0, grid_size=3)
    with pytest.raises(ValueError, match="too small for walks of 8 hops"):
        generate_samples("walk", 1, seed=0, grid_size=4, hops=8)
    with pytest.raises(ValueError, match="hops must be in"):
        generate_samples("walk", 1, seed=0, hops=0)
    with pytest.raises(ValueError, match="only to the walk"):
        generate_samples("lookup", 1, seed=0, hops=2)


def test_processor_expands_image_and_pads_left(tmp_path):
    proc = ShiftBenchProcessor.build()
    samples = generate_samples("lookup", 1, seed=0) + generate_samples("walk", 1, seed=0, hops=2)
    batch = proc([s.image for s in samples], [s.prompt for s in samples])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (2, 3, 96, 96)
    assert (ids == proc.image_token_id).sum(-1).tolist() == [144, 144]
    assert mask[0, 0] == 0 and mask[1].all()  # the shorter lookup prompt is padded on the left
    assert proc.decode(proc.tokenizer(samples[1].target, add_special_tokens=False)["input_ids"]) == samples[1].target
    proc.save_pretrained(tmp_path)
    again = ShiftBenchProcessor.from_pretrained(tmp_path)
    assert torch.equal(again([samples[0].image], [samples[0].prompt])["input_ids"], ids[:1, 1:])


def test_shipped_checkpoint_is_small_and_loads(shipped):
    files = list(default_checkpoint_dir().iterdir())
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    assert (default_checkpoint_dir() / "MODEL_CARD.md").exists()
    model, proc = shipped
    assert type(model.language_model).__name__ in ("LlamaModel", "Qwen2Model")
    assert model.config.architectures == ["ShiftBenchForConditionalGeneration"]


def test_visual_token_i_is_cell_i(shipped):
    model, proc = shipped
    s = generate_samples("lookup", 1, seed=9)[0]
    symbols = s.symbols.copy()
    symbols[5, 7] = (symbols[5, 7] + 1) % len(SYMBOLS)
    if not 0 <= apply_move((5, 7), int(symbols[5, 7]))[0] < 12:
        symbols[5, 7] = SYMBOLS.index("L1")
    a = proc([s.image], [s.prompt])
    b = proc([render_grid(symbols)], [s.prompt])
    with torch.no_grad():
        ea, vis = model.embed_multimodal(a["input_ids"], a["pixel_values"])
        eb, _ = model.embed_multimodal(b["input_ids"], b["pixel_values"])
    changed = (ea - eb).abs().amax(-1)[vis].nonzero().squeeze(-1).tolist()
    assert changed == [5 * 12 + 7]


@pytest.mark.parametrize("task", TASKS)
def test_shipped_model_solves_fresh_samples(shipped, task):
    model, proc = shipped
    result = evaluate(model, proc, task, 20, seed=31337)
    assert result["n"] == 20
    assert result["accuracy"] >= 0.9, result
