"""ShiftBench: generator, renderer, answer checker, dependency sets, processor, shipped model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dstp.lab.shiftbench import TASKS, check_answer, default_checkpoint_dir, evaluate, generate_samples, load_shiftbench
from dstp.lab.shiftbench.processor import ShiftBenchProcessor
from dstp.lab.shiftbench.render import GRID_LINE, PALETTE, render_grid
from dstp.lab.shiftbench.symbols import cell_name, parse_cell_name


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
    assert s.pointers.shape == (12, 12)
    assert s.image.shape == (96, 96, 3) and s.image.dtype == np.uint8
    assert np.array_equal(render_grid(s.pointers), s.image)
    assert (s.pointers.reshape(-1) != np.arange(144)).all()  # no cell points at itself


def test_renderer_pixels_of_a_cell():
    p = 8
    pointers = np.zeros((4, 4), dtype=np.int64)
    pointers[2, 1] = 3 * 4 + 0  # cell (2, 1) points at (3, 0)
    image = render_grid(pointers, p)
    cell = image[2 * p : 3 * p, 1 * p : 2 * p]
    assert tuple(cell[0, 4]) == GRID_LINE and tuple(cell[4, 0]) == GRID_LINE
    for row in (1, 2, 3):  # top band: the pointed-to row
        assert tuple(cell[row, 5]) == PALETTE[3]
    for row in (4, 5, 6, 7):  # bottom band: the pointed-to column
        assert tuple(cell[row, 5]) == PALETTE[0]
    assert tuple(image[1, 5]) == PALETTE[0] and tuple(image[5, 5]) == PALETTE[0]  # cell (0, 0) -> (0, 0)
    # a cell's pixels depend on that cell's pointer only
    changed = pointers.copy()
    changed[2, 1] = 1 * 4 + 2
    diff = np.any(render_grid(changed, p) != image, axis=-1)
    rows, cols = np.nonzero(diff)
    assert rows.min() >= 2 * p and rows.max() < 3 * p and cols.min() >= p and cols.max() < 2 * p
    assert tuple(render_grid(changed, p)[2 * p + 1, p + 5]) == PALETTE[1]


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
        g = s.pointers.shape[0]
        flat = s.pointers.reshape(-1)
        words = s.target.split()
        r, c = parse_cell_name(s.prompt.split()[-1])
        cells = [r * g + c]
        for _ in range(s.hops):
            cells.append(int(flat[cells[-1]]))
        assert len(set(cells)) == s.hops + 1  # no cell visited twice
        assert s.cells_needed == cells[:-1]
        assert s.answer == cell_name(cells[-1] // g, cells[-1] % g) == words[-1] and words[-2] == "="
        assert len(words) == len(s.token_dependencies) == len(s.token_reads) == s.hops + 2
        for i in range(s.hops):
            assert words[i] == cell_name(cells[i + 1] // g, cells[i + 1] % g)
            assert s.token_reads[i] == {cells[i]}
            assert s.token_dependencies[i] == set(cells[: i + 1])
        assert s.token_dependencies[-1] == set(cells[:-1])


def test_lookup_and_pair_dependencies():
    for s in generate_samples("lookup", 10, seed=1):
        r, c = parse_cell_name(s.prompt.split()[-1])
        assert s.cells_needed == [r * 12 + c]
        target = int(s.pointers[r, c])
        assert s.answer == cell_name(target // 12, target % 12)
        assert s.token_dependencies[-1] == {r * 12 + c}
    answers = set()
    for s in generate_samples("pair", 40, seed=1):
        (ra, ca), (rb, cb) = (parse_cell_name(w) for w in s.prompt.split()[-2:])
        assert s.cells_needed == [ra * 12 + ca, rb * 12 + cb]
        same = s.pointers[ra, ca] == s.pointers[rb, cb]
        assert s.answer == ("same" if same else "diff")
        assert s.token_dependencies[-1] == set(s.cells_needed)
        pa, pb = int(s.pointers[ra, ca]), int(s.pointers[rb, cb])
        assert s.target.split() == [cell_name(pb // 12, pb % 12), cell_name(pa // 12, pa % 12), "=", s.answer]
        answers.add(s.answer)
    assert answers == {"same", "diff"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown ShiftBench task 'count'.*lookup, pair, walk"):
        generate_samples("count", 1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        generate_samples("lookup", 1, seed=0, grid_size=1)
    with pytest.raises(ValueError, match="too large"):
        generate_samples("lookup", 1, seed=0, grid_size=17)
    with pytest.raises(ValueError, match="too small for walks of 5 hops"):
        generate_samples("walk", 1, seed=0, grid_size=3, hops=5)
    assert len(generate_samples("walk", 2, seed=0, grid_size=4, hops=5)) == 2
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
    pointers = s.pointers.copy()
    pointers[5, 7] = 0 if pointers[5, 7] != 0 else 1
    b = proc([render_grid(pointers)], [s.prompt])
    a = proc([s.image], [s.prompt])
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


def test_shipped_checkpoint_is_the_default_recipe():
    # `dstp shiftbench train --seed 0` must reproduce the shipped model: same recipe as the trainer's defaults
    import json
    from dataclasses import asdict

    from dstp.lab.shiftbench.train import TrainConfig

    record = json.loads((default_checkpoint_dir() / "training_record.json").read_text())
    default = json.loads(json.dumps(asdict(TrainConfig(seed=record["seed"]))))
    assert record["config"] == default
    # item 5: FastV's depth-scaled K prunes below the layer that reads the cells
    from dstp.pruners import depth_scaled_layer

    assert depth_scaled_layer(default["layers"]) <= default["read_layer"]


def test_layers_below_a_deeper_reader_start_as_frozen_identities():
    from dstp.lab.shiftbench.train import TrainConfig, build_model, lower_lr_scale

    cfg = TrainConfig(layers=4, read_layer=2, freeze_below_steps=10, below_ramp_steps=10)
    model = build_model(cfg, ShiftBenchProcessor.build())
    lm = model.language_model
    h = torch.randn(2, 5, cfg.hidden)
    pos = torch.arange(5)[None].expand(2, -1)
    emb = lm.rotary_emb(h, pos)
    for layer in lm.layers[:2]:
        assert torch.equal(layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb), h)
    assert not torch.equal(lm.layers[2](h, attention_mask=None, position_ids=pos, position_embeddings=emb), h)
    assert [lower_lr_scale(s, cfg) for s in (0, 9, 10, 15, 20, 99)] == [0.0, 0.0, 0.0, 0.25, 1.0, 1.0]


def test_default_recipe_retraces_the_shipped_training_log():
    # the first optimiser steps of `dstp shiftbench train --seed 0` against the shipped checkpoint's own log
    import json

    from dstp.lab.shiftbench.train import TrainConfig, start_run, train_step

    log = Path(__file__).resolve().parents[1] / "docs" / "results" / "shipped-model" / "train_log.jsonl"
    logged = [json.loads(line) for line in log.open()][1:4]
    torch.set_num_threads(2)
    run = start_run(TrainConfig(seed=0))
    for rec in logged:
        loss, acc, hops = train_step(run, rec["step"])
        assert hops == rec["max_hops"]
        assert loss == pytest.approx(rec["loss"], abs=2e-3)
        assert acc == pytest.approx(rec["token_acc"], abs=2e-3)


def test_training_hides_only_visual_tokens_no_question_needs():
    # the pruning-robustness augmentation: a uniform random share of the unneeded cells, never a needed one
    import numpy as np

    from dstp.lab.shiftbench.train import Packer, TrainConfig

    cfg = TrainConfig(hide_rows=1.0, hide_max=0.9)
    processor = ShiftBenchProcessor.build(cfg.grid_size, cfg.cell_pixels)
    vocab, eos = processor.tokenizer.get_vocab(), processor.tokenizer.eos_token_id
    cell_of = {vocab[f"r{r}c{c}"]: r * cfg.grid_size + c for r in range(cfg.grid_size) for c in range(cfg.grid_size)}
    word = {i: w for w, i in vocab.items()}
    packer, n_cells, hidden_shares = Packer(cfg, processor), cfg.grid_size**2, []
    for _ in range(20):
        _, ids, labels, visible = packer.sequence(max_hops=6)
        assert len(visible) == len(ids) and visible[0] == 1 and visible[1 + n_cells:].all()
        needed, segment = set(), []
        for tok in ids[1 + n_cells:]:
            segment.append(tok)
            if tok != eos:
                continue
            cells = [cell_of[t] for t in segment if t in cell_of]
            # lookup / pair: the cells the question names; walk: the start and every hop but the last
            needed.update(cells[:-2] if word[segment[0]] == "walk" else cells[: 1 if word[segment[0]] == "lookup" else 2])
            segment = []
        image_visible = visible[1:1 + n_cells]
        assert needed and all(image_visible[c] == 1 for c in needed)
        hidden_shares.append(1 - image_visible.sum() / n_cells)
    assert max(hidden_shares) > 0.3 and min(hidden_shares) < max(hidden_shares)
    assert np.array_equal(Packer(cfg, processor).sequence(6)[3], Packer(cfg, processor).sequence(6)[3])  # seeded


def test_revival_check_counts_are_consistent():
    # in a walk the token fed in names the cell read next, so "revived the needed cell" and "revived the fed
    # token's cell" are the same event; every count is bounded by the steps whose read was pruned
    import dstp
    from dstp.config import DSTPConfig, PruneConfig
    from dstp.lab.shiftbench.revival_check import named_cell, revival_check

    assert named_cell("r3c7", 12) == 43 and named_cell("same", 12) is None
    pipe = dstp.load(str(default_checkpoint_dir()), prune=PruneConfig("fastv", 0.111), shift=DSTPConfig())
    walk = revival_check(pipe, "walk", n=12, seed=5, batch_size=6)
    assert walk["missing_reads"] > 0
    assert walk["revived_needed"] == walk["revived_fed_cell"] <= walk["shifted"] <= walk["missing_reads"]
    pair = revival_check(pipe, "pair", n=12, seed=5, batch_size=6)
    assert max(pair["revived_needed"], pair["revived_fed_cell"]) <= pair["shifted"] <= pair["missing_reads"]


# ---- what the processor accepts ------------------------------------------------------------------
@pytest.fixture(scope="module")
def walk3():
    return generate_samples("walk", 1, seed=0, hops=3)[0]


@pytest.mark.parametrize("prompt,needle", [
    ("<image> describe this picture", "unknown word 'describe'"),
    ("<image> lookup r12c3", "cell r12c3 in prompt '<image> lookup r12c3' is outside the 12x12 grid"),
    ("<image> lookup r03c1", "cells are written r3c1"),
    ("<image> walk h7 r1c1", "built for walks of 1..6 hops"),  # the shipped model trained on 1..6
    ("<image> walk h0 r1c1", "built for walks of 1..6 hops"),
    ("lookup r1c1", "needs exactly one <image>, found 0"),
    ("<image> <image> lookup r1c1", "found 2"),
    ("lookup <image> r1c1", "must start with <image>"),
    ("<image> pair r1c1", "pair takes CELL CELL"),
    ("<image> walk r1c1 h3", "walk takes HOPS CELL"),
    ("<image> lookup r1c1 walk", "continues with 'walk' after the question"),
    ("<image> lookup r1c1 <eos> r2c2", "continues with '<eos>'"),
])
def test_prompts_outside_the_language_are_rejected_by_name(shipped, walk3, prompt, needle):
    from dstp.errors import InputError

    _, proc = shipped
    with pytest.raises(InputError, match=re.escape(needle)):
        proc([walk3.image], [prompt])


def test_the_language_includes_teacher_forced_answers(shipped, walk3):
    _, proc = shipped
    ids = proc([walk3.image], [f"{walk3.prompt} {walk3.target} <eos>"])["input_ids"]
    assert ids.shape[1] == 1 + 144 + 3 + len(walk3.target.split()) + 1


def test_max_hops_comes_from_the_training_record(tmp_path):
    assert load_shiftbench()[1].max_hops == 6
    proc = ShiftBenchProcessor.build()
    proc.save_pretrained(tmp_path)  # no training record: the vocabulary's h1..h8
    again = ShiftBenchProcessor.from_pretrained(tmp_path)
    assert again.max_hops is None
    s = generate_samples("walk", 1, seed=0, hops=8)[0]
    assert again([s.image], [s.prompt])["input_ids"].shape[0] == 1
    ShiftBenchProcessor(proc.tokenizer, max_hops=4).save_pretrained(tmp_path)
    assert ShiftBenchProcessor.from_pretrained(tmp_path).max_hops == 4


def _bad_images(image):
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, image.shape).astype(np.uint8)
    return [
        (np.zeros((100, 80, 3), np.uint8), "image is 80x100 pixels; ShiftBench renders are 96x96"),
        (Image.fromarray(image).convert("L"), "image has mode 'L'"),
        (Image.fromarray(image).convert("RGBA"), "image has mode 'RGBA'"),
        (torch.from_numpy(image).permute(2, 0, 1), "image has shape (3, 96, 96)"),
        (image.astype(np.float32), "float images must lie in [0, 1]"),  # 0..255 as floats: not cast to garbage
        (np.full(image.shape, np.nan, np.float32), "image has NaN or infinite values"),
        (image.astype(np.int16) * 3, "integer images must lie in 0..255"),
        (image > 0, "has dtype bool"),
        (noise, "is not a ShiftBench render"),
        (None, "no images given"),
    ]


def test_images_that_are_not_renders_are_rejected_by_name(shipped, walk3):
    from dstp.errors import InputError

    _, proc = shipped
    for image, needle in _bad_images(walk3.image):
        with pytest.raises(InputError, match=re.escape(needle)):
            proc(image, [walk3.prompt])


def test_a_lossy_copy_is_not_a_render(shipped, walk3):
    # JPEG at quality 95 drops the shipped model's walk accuracy to 0.66 (measured), so it is refused
    import io

    from PIL import Image

    from dstp.errors import InputError

    buf = io.BytesIO()
    Image.fromarray(walk3.image).save(buf, "JPEG", quality=95)
    with pytest.raises(InputError, match="lossy formats such as JPEG"):
        shipped[1]([Image.open(buf).convert("RGB")], [walk3.prompt])


def test_every_image_form_of_a_render_gives_the_same_pixels(shipped, walk3):
    from PIL import Image

    _, proc = shipped
    want = proc([walk3.image], [walk3.prompt])["pixel_values"]
    for form in (walk3.image.astype(np.float32) / 255, walk3.image.astype(np.float64) / 255,
                 torch.from_numpy(walk3.image), walk3.image.astype(np.int64), Image.fromarray(walk3.image)):
        assert torch.equal(proc([form], [walk3.prompt])["pixel_values"], want)


def test_batch_shape_problems_are_named(shipped, walk3):
    from dstp.errors import InputError

    _, proc = shipped
    with pytest.raises(InputError, match="got 2 images but 1 prompts"):
        proc([walk3.image] * 2, [walk3.prompt])
    with pytest.raises(InputError, match="no prompts given"):
        proc([], [])
    with pytest.raises(InputError, match="prompts must be a string or a list of strings, got int"):
        proc([walk3.image], 5)
    with pytest.raises(InputError, match="image 1 is 90x96"):
        proc([walk3.image, walk3.image[:, :90]], [walk3.prompt] * 2)


def test_pointers_and_needed_cells_read_back_from_a_render():
    from dstp.lab.shiftbench.inputs import read_pointers, relevant_cells

    for task in TASKS:
        for s in generate_samples(task, 5, seed=2):
            assert np.array_equal(read_pointers(s.image), s.pointers)
            assert relevant_cells(s.prompt, s.image) == s.cells_needed


def test_evaluation_helpers_reject_bad_arguments_before_running(shipped):
    from dstp.errors import ConfigError
    from dstp.lab.shiftbench.evaluation import prefill_recall, pruned_accuracy

    model, proc = shipped
    with pytest.raises(ConfigError, match="n must be >= 1"):
        evaluate(model, proc, "walk", 0, seed=0)
    with pytest.raises(ConfigError, match="unknown method 'visionzip'; known: fastv, random, prompt_oracle"):
        pruned_accuracy(model, proc, "walk", 0.333, 1, method="visionzip")
    with pytest.raises(ConfigError, match=re.escape("layer 0 is outside 1..15")):
        pruned_accuracy(model, proc, "walk", 0.333, 0, method="fastv")
    with pytest.raises(ConfigError, match=re.escape("retention must be in (0, 1]")):
        prefill_recall(model, proc, "walk", 1.5, layer=0)
    with pytest.raises(ConfigError, match=re.escape("layer 16 is outside 0..15")):
        prefill_recall(model, proc, "walk", 0.333, layer=16)


def test_revival_check_with_the_oracle_finds_no_pruned_read():
    # the oracle keeps every cell a walk needs (revival_check passes them), so no step misses its read
    import dstp
    from dstp.config import DSTPConfig, PruneConfig
    from dstp.lab.shiftbench.revival_check import revival_check

    pipe = dstp.load(str(default_checkpoint_dir()), prune=PruneConfig("oracle", 0.111), shift=DSTPConfig())
    assert revival_check(pipe, "walk", n=6, seed=5, batch_size=6)["missing_reads"] == 0
