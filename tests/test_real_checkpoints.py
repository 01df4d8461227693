"""The checkpoints users run, at real width (tests/real_checkpoints.py): published configs, random weights, fewer
layers, loaded by their hub id offline. `dstp.load(id, dtype="bfloat16")` + `pipe.chat` on one 1280x960 photo-sized
image gives transformers' own `model.generate(do_sample=False)` tokens; every pruner and DSTP run at that scale.

What "equal to generate()" means once tokens are pruned (generate() cannot prune):
- unpruned: dstp's tokens == generate()'s, token for token (one test per family in `make test`);
- every pruner at retention 1.0 keeps every visual token and == generate()'s tokens, and at 0.25 keeps exactly
  k = ceil(retention * N) (PyramidDrop: its last stage; multi-stage pruners shrink stage by stage): on LLaVA-1.5;
- on every checkpoint FastV at 0.25 keeps k, DSTP that never triggers (tau=-1, `recompute`) == FastV's tokens, and
  forced shifts revive tokens with both K/V sources (the `real_slow` set, `make test-real`).
Runs after the first reuse one prepared input (`prepare_chat(..., vision_scores=True)`), so the vision tower runs
once per checkpoint for dstp and once for generate(). The `real_slow` set adds Qwen3-VL-8B's equality test (the
published DeepStack indexes) and the pruner / DSTP runs."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pathlib

import pytest
import torch

import dstp
import hub_fixtures as H
import real_checkpoints as R
from dstp import DSTPConfig, PruneConfig

HF_HUB_CACHE = pathlib.Path(os.environ["HF_HUB_CACHE"])  # tests/conftest.py: <repo>/.pytest_cache/hf-home/hub
NEW = 8
QUESTION = "What is in this picture? Describe it in a few words."
METHODS = ("fastv", "divprune", "visionzip", "sparsevlm", "pyramiddrop", "cdpruner", "random", "uniform")
RETENTION = 0.25

# one checkpoint per family runs in plain `make test`; the rest only in the `real_slow` set
FAST = {"llava": "llava-hf/llava-1.5-7b-hf", "llava_next": "llava-hf/llava-v1.6-mistral-7b-hf",
        "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen3_vl": "Qwen/Qwen3-VL-4B-Instruct",
        "internvl": "OpenGVLab/InternVL3_5-8B-HF"}
assert set(FAST.values()) == {r for r, s in R.CHECKPOINTS.items() if not s.slow}
ALL = list(R.CHECKPOINTS)


def slow_unless_fast(repo_id):
    return () if repo_id in FAST.values() else (pytest.mark.real_slow,)


# visual tokens of the 1280x960 image at each processor's default resolution
VISUAL_TOKENS = {
    "llava-hf/llava-1.5-7b-hf": 576,            # 336x336 centre crop, 24x24 patches
    "llava-hf/llava-v1.6-mistral-7b-hf": 2340,  # base 576 + 2x2 crops of 672x672 unpadded to 36x48 + 36 newlines
    "Qwen/Qwen2.5-VL-7B-Instruct": 1564,        # resized to 1288x952, 28 px a token: 46x34
    "Qwen/Qwen3-VL-4B-Instruct": 1200,          # 32 px a token: 40x30
    "Qwen/Qwen3-VL-8B-Instruct": 1200,
    # crop_to_patches: the published preprocessor_config.json says false, but InternVLProcessor's call-time default
    # (images_kwargs crop_to_patches=True) wins in transformers 5.17 and 5.25 alike: 4:3 -> 4x3 tiles of 448x448
    # (max_patches 12) + a thumbnail tile = 13 tiles x 256 tokens (32x32 patches, pixel shuffle 0.5)
    "OpenGVLab/InternVL3_5-8B-HF": 3328,
}


def conversations(seed: int = 0):
    return [H.conversation([R.photo(seed)], QUESTION)]


def reference_tokens(pipe, convs, **generate_kwargs):
    """transformers' own generate() on the processor's output for the same conversations."""
    processor, model = pipe.processor, pipe.adapter.model
    inputs = processor.apply_chat_template(copy.deepcopy(convs), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=NEW, **generate_kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


_PIPES: dict[str, object] = {}
_ON_DISK: list[str] = []  # the one real-width stand-in built and not yet removed


def built(repo_id: str) -> None:
    """Build `repo_id` into the test cache, first removing the stand-in built before it: a 7B-class stand-in is 2-4 GB
    and CI's disk is not ours to fill, so at most one lies on disk (tests/conftest.py runs this module's tests
    grouped by checkpoint, so each is built once a session; the last is removed when the module ends)."""
    if _ON_DISK and _ON_DISK[0] != repo_id:
        _PIPES.clear()
        R.remove(HF_HUB_CACHE, _ON_DISK.pop())
    R.build(HF_HUB_CACHE, repo_id)
    _ON_DISK[:] = [repo_id]


@pytest.fixture(scope="module", autouse=True)
def _remove_the_last_stand_in():
    yield
    _PIPES.clear()
    while _ON_DISK:
        R.remove(HF_HUB_CACHE, _ON_DISK.pop())


def pipeline(repo_id: str):
    """dstp.load(repo_id) of the built checkpoint, one in memory at a time."""
    if repo_id not in _PIPES:
        _PIPES.clear()  # keep one model in memory at a time
        built(repo_id)
        _PIPES[repo_id] = dstp.load(repo_id, dtype="bfloat16")
    return _PIPES[repo_id]


# ----------------------------------------------------------------------------------------------------------
# cheap checks of every checkpoint's sources (no model built)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id", ALL)
def test_reduced_config_changes_only_layer_counts(repo_id):
    published, reduced = R.published_json(repo_id, "config.json"), R.reduced_config(repo_id)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(published), flat(reduced)
    assert a.keys() <= b.keys()  # LLaVA's text_config states no layer count (LlamaConfig's default 32): added
    changed = {k for k in b if a.get(k, "absent") != b[k]}
    allowed = {"num_hidden_layers", "depth", "max_window_layers", "layer_types"}  # layer_types: one a layer
    if R.CHECKPOINTS[repo_id].deepstack is not None:  # Qwen3-VL-4B (real_checkpoints' docstring)
        allowed.add("deepstack_visual_indexes")
    assert changed and {k.rsplit(".", 1)[-1] for k in changed} <= allowed, changed
    for k in (k for k in changed if k.endswith("layer_types")):
        assert b[k] == a[k][:R.LLM_LAYERS], k
    assert reduced["vision_config"].get("deepstack_visual_indexes") == (
        list(R.CHECKPOINTS[repo_id].deepstack or published["vision_config"].get("deepstack_visual_indexes", [])) or None)


@pytest.mark.parametrize("repo_id", ALL)
def test_tokenizer_has_every_added_token_at_its_real_id_after_a_reload(repo_id, tmp_path):
    from transformers import AutoTokenizer

    tok, n_trained = R.tokenizer(repo_id)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    real = R.added_tokens(repo_id)
    assert {c: again.convert_tokens_to_ids(c) for c, _ in real.values()} == {c: i for i, (c, _) in real.items()}
    text = "The picture shows a red square on the left."
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and 0 < len(ids) < len(text)
    assert max(ids) < n_trained and again.decode(ids).strip() == text
    assert again.chat_template == tok.chat_template


# The hub's Git blob ids of published files that were rebuilt here rather than copied (tests/real_configs/SOURCES.md):
# sha1(b"blob <size>\0" + bytes), as `git hash-object` prints it. A match means the bytes are the published ones.
REBUILT_BLOBS = {
    "OpenGVLab/InternVL3_5-8B-HF": {
        "config.json": "e649dc4968d1a55b93277a3ee38951308c43b7c8",
        "generation_config.json": "4f0c4ce3e3028b76812135c422c721c3e77b10b6",
        "preprocessor_config.json": "a7b376e0a83f26eaa784db792ef61be7aac5494f",
        "video_preprocessor_config.json": "312440223df86c67a0794043b915a0422a685971",
        "processor_config.json": "e543bcb3b7550029f450d28cf138706d7f9a5ef5",
        "chat_template.jinja": "0b19f45e0cd40b10374f24065639b0c2eee18a22",
        "tokenizer_config.json": "16f34ecc26e1a1c213ab719189e1407e3e200196",
        "special_tokens_map.json": "253d50d9027f558bd5478163a49ccd263fc27959",
        "added_tokens.json": "3ecaee9890f76c964b4bf550a85293b874b71b87",
    },
}


@pytest.mark.parametrize("repo_id", list(REBUILT_BLOBS))
def test_rebuilt_published_files_are_byte_identical_to_the_hub_blobs(repo_id):
    folder = R.REAL_CONFIGS / R.CHECKPOINTS[repo_id].folder
    assert {f.name for f in folder.iterdir()} == set(REBUILT_BLOBS[repo_id])
    for name, blob_id in REBUILT_BLOBS[repo_id].items():
        data = (folder / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob_id, name


# ----------------------------------------------------------------------------------------------------------
# unpruned: dstp == generate()
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id", [pytest.param(r, marks=slow_unless_fast(r)) for r in ALL])
def test_chat_equals_generate_at_real_width(repo_id):
    pipe = pipeline(repo_id)
    spec = R.CHECKPOINTS[repo_id]
    model = pipe.adapter.model
    assert type(model).__name__ == R.published_json(repo_id, "config.json")["architectures"][0]
    assert model.get_input_embeddings().weight.shape[1] == model.config.get_text_config().hidden_size
    assert pipe.adapter.n_layers == R.LLM_LAYERS and pipe.adapter.family == spec.family
    convs = conversations()
    expected = reference_tokens(pipe, convs, do_sample=False)
    out = pipe.chat(convs, max_new_tokens=NEW, do_sample=False)
    assert out.trace.n_visual == [VISUAL_TOKENS[repo_id]]
    assert torch.equal(out.tokens, expected), (out.tokens.tolist(), expected.tolist())
    if spec.family != "qwen3_vl":
        # Qwen3-VL's stand-ins (the 4B's tied head, and the 8B's too, measured) answer one repeated token with random
        # weights (HF-FIXTURES.md): there only the equality with generate() is checked
        assert len(set(out.tokens[0].tolist())) > 1, "degenerate answer: one repeated token"


# ----------------------------------------------------------------------------------------------------------
# pruners and DSTP at real scale (the `real_slow` set)
# ----------------------------------------------------------------------------------------------------------

def _runs(repo_id):
    """(pipe, prepared inputs with the encoder internals, greedy settings, generate()'s tokens)."""
    pipe = pipeline(repo_id)
    convs = conversations()
    key = ("prepared", repo_id)
    if key not in _PIPES:
        _PIPES[key] = (pipe.prepare_chat(convs, vision_scores=True), reference_tokens(pipe, convs, do_sample=False))
    prepared, expected = _PIPES[key]
    return pipe, prepared, pipe.generation_config(NEW, {"do_sample": False}), expected


def _run(pipe, prepared, config, prune=None, shift=None):
    return dstp.from_model(pipe.adapter.model, pipe.processor, prune=prune, shift=shift).generate_prepared(
        prepared, config)


# Every pruner on one checkpoint (LLaVA-1.5: the cheapest, 576 visual tokens, and its answers depend on the image);
# on every checkpoint one in-LLM pruner with DSTP. A prefill of 1,200-3,300 tokens at 7B width costs 10-30 s in bf16 on
# a 2-core CPU, so the set is sized to run in CI (the pruners' rules are tested per family on tiny models).
EVERY_PRUNER = "llava-hf/llava-1.5-7b-hf"
# the checkpoint each test without a `repo_id` parameter builds (tests/conftest.py groups this module's tests by it)
CHECKPOINT_OF = {"test_every_pruner_at_real_width": EVERY_PRUNER,
                 "test_missing_config_field_is_one_line_naming_field_and_file": "llava-hf/llava-1.5-7b-hf"}


def _keeps_k(out, method, n):
    k = math.ceil(RETENTION * n)
    assert out.trace.n_visual == [n], method
    if len(out.trace.stages) > 1:  # multi-stage: shrinking stages, S0 the last one
        sizes = [len(kept[0]) for _, kept in out.trace.stages]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] < n, (method, sizes)
        assert out.trace.kept[0] == out.trace.stages[-1][1][0], method
        if method == "pyramiddrop":  # its last stage keeps k; SparseVLM's retention is a budget averaged
            assert sizes[-1] == k, sizes  # over its stages (src/dstp/pruners/sparsevlm.py)
    else:
        assert [len(kept) for kept in out.trace.kept] == [k], method
    assert 0 < out.trace.new_tokens[0] <= NEW, method


@pytest.mark.real_slow
def test_every_pruner_at_real_width():
    """Every pruner at retention 1.0 keeps every visual token and answers as generate(); at 0.25 it keeps k."""
    pipe, prepared, config, expected = _runs(EVERY_PRUNER)
    n = VISUAL_TOKENS[EVERY_PRUNER]
    assert torch.equal(_run(pipe, prepared, config).tokens, expected)  # the shared prepared inputs are the same
    for method in METHODS:
        out = _run(pipe, prepared, config, PruneConfig(method, 1.0))
        assert [len(k) for k in out.trace.kept] == [n], method
        assert torch.equal(out.tokens, expected), (method, out.tokens.tolist(), expected.tolist())
        _keeps_k(_run(pipe, prepared, config, PruneConfig(method, RETENTION)), method, n)


@pytest.mark.real_slow
@pytest.mark.parametrize("repo_id", ALL)
def test_fastv_and_dstp_at_real_width(repo_id):
    """FastV at 0.25 keeps k; DSTP (`recompute`) that never triggers answers as FastV; forced shifts with random
    targets (so that each shift revives tokens whatever the random weights' attention) revive with both sources.
    (`store` never triggered need not equal FastV: it is an unpruned prefill from the prune point, so even the kept
    tokens' K/V saw every visual token; DESIGN.md section 5.)"""
    pipe, prepared, config, _ = _runs(repo_id)
    prune = PruneConfig("fastv", RETENTION)
    vanilla = _run(pipe, prepared, config, prune)
    _keeps_k(vanilla, "fastv", VISUAL_TOKENS[repo_id])
    never = _run(pipe, prepared, config, prune, DSTPConfig(tau=-1.0))
    assert torch.equal(never.tokens, vanilla.tokens)
    assert not any(s["shift"] for s in never.trace.row(0)["steps"])
    for source in ("store", "recompute"):
        out = _run(pipe, prepared, config, prune, DSTPConfig(force_every=2, window=2, source=source, variant="random"))
        steps = out.trace.row(0)["steps"]
        assert any(s["shift"] for s in steps) and any(s["revived"] for s in steps), source
        assert 0 < out.trace.new_tokens[0] <= NEW, source


# ----------------------------------------------------------------------------------------------------------
# a checkpoint whose config.json lacks a field the adapter needs
# ----------------------------------------------------------------------------------------------------------

def test_missing_config_field_is_one_line_naming_field_and_file(tmp_path):
    repo_id = CHECKPOINT_OF["test_missing_config_field_is_one_line_naming_field_and_file"]
    built(repo_id)
    snapshot = R.snapshot_dir(HF_HUB_CACHE, repo_id)
    for f in snapshot.iterdir():
        (tmp_path / f.name).symlink_to(f.resolve())
    config = json.loads((snapshot / "config.json").read_text())
    del config["vision_config"]
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(dstp.DSTPError) as info:
        dstp.load(str(tmp_path), dtype="bfloat16")
    message = str(info.value)
    assert "\n" not in message and "vision_config" in message and "config.json" in message, message
