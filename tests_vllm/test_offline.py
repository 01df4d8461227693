"""vLLM's offline `LLM.generate` with the dstp plugin against dstp's own engine (`dstp.load`), tiny random models,
float32, CPU, greedy: a batch of four requests with four different images in one engine.

Each engine run is a subprocess (conftest.run_engine); the reference runs each request alone through dstp's engine
(batch 1, where dstp's row is that request's one image, as vLLM prunes each image on its own).
"""
from __future__ import annotations

import pytest

from conftest import MAX_TOKENS, QUESTION, chat_prompt

FAMILIES = ("llava", "qwen2_5_vl", "qwen3_vl")
METHODS = ("divprune", "random", "uniform", "cdpruner", "visionzip")
RETENTION = 0.25


def spec(checkpoints, images, family, overrides, max_tokens=MAX_TOKENS, repeats=0):
    prompt = chat_prompt(checkpoints[family])
    return {"model": str(checkpoints[family]), "hf_overrides": overrides, "max_tokens": max_tokens,
            "requests": [{"prompt": prompt, "images": [p]} for p in images[1]], "repeats": repeats,
            "block_size": 32}  # the CPU backend's smallest: prompts of 40-70 tokens fill a cacheable block


def kept(n: int, retention: float) -> int:
    import math
    return max(1, math.ceil(n * retention - 1e-9))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_pruned_tokens_equal_dstp_engine(family, method, checkpoints, images, run_engine, reference):
    out = run_engine(spec(checkpoints, images, family, {"dstp": {"method": method, "retention": RETENTION}},
                          repeats=1))
    ref = reference(family, method, RETENTION)
    full = reference(family, None)
    got = [o["token_ids"] for o in out["outputs"]]
    assert got == [r["tokens"] for r in ref]
    # the same requests again: their prompts now come from vLLM's prefix cache (and their images from its caches)
    (again,) = out["repeat_outputs"]
    assert [o["token_ids"] for o in again] == got
    # more of each prompt came from the cache the second time: blocks holding image placeholders (Qwen2.5-VL's
    # first 32 tokens, its system prompt, are shared by the four requests already in the first call)
    assert sum(o["cached_tokens"] for o in again) > sum(o["cached_tokens"] for o in out["outputs"])
    # the request really is shorter: k of N placeholders per image, so its KV cache holds N - k fewer tokens
    for o, r in zip(out["outputs"], ref):
        n = r["n_visual"]
        assert len(o["prompt_token_ids"]) == r["prompt_len"] - (n - kept(n, RETENTION))
    # and pruning changed what the model says (else the comparison above would not tell pruners apart)
    assert got != [r["tokens"] for r in full]
    if family != "llava":  # Qwen-VL: the four images have different token counts, so different k
        assert len({r["n_visual"] for r in ref}) == 4
    if method == "visionzip":  # some images get merged (contextual) tokens, so the comparison covers merging
        from dstp.pruners.visionzip import contextual_count
        assert any(contextual_count(kept(r["n_visual"], RETENTION), 10 / 64) >= 1 for r in ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_without_dstp_key_is_vllms_model(family, checkpoints, images, run_engine, reference):
    """No `dstp` key: the plugin's class runs as vLLM's own; tokens equal dstp's unpruned engine (itself equal to
    transformers' generate(), tests/), and so do retention 1.0 tokens, through the plugin's position path."""
    plain = run_engine(spec(checkpoints, images, family, None))
    full = reference(family, None)
    assert [o["token_ids"] for o in plain["outputs"]] == [r["tokens"] for r in full]
    assert [len(o["prompt_token_ids"]) for o in plain["outputs"]] == [r["prompt_len"] for r in full]
    whole = run_engine(spec(checkpoints, images, family, {"dstp": {"method": "divprune", "retention": 1.0}}))
    assert [o["token_ids"] for o in whole["outputs"]] == [r["tokens"] for r in full]


OTHER_QUESTION = "Which colour fills the upper left corner? Answer with one word."


@pytest.mark.parametrize("family", FAMILIES)
def test_cdpruner_selects_per_prompt(family, checkpoints, images, run_engine, reference):
    """cdpruner conditions on the instruction: the same images under two questions, in one batch and again (vLLM's
    processor, encoder and prefix caches all hold the first request of each image when the second arrives), give
    dstp's tokens for each question. The test sees the caches: on these images dstp keeps different tokens for
    the two questions, so a cache keyed on the image alone would serve the other question's selection."""
    _, paths = images
    path = checkpoints[family]
    questions = (QUESTION, OTHER_QUESTION)
    requests = [{"prompt": chat_prompt(path, question=q), "images": [paths[i]]} for i in (0, 1) for q in questions]
    out = run_engine({"model": str(path), "hf_overrides": {"dstp": {"method": "cdpruner", "retention": RETENTION}},
                      "max_tokens": MAX_TOKENS, "requests": requests, "repeats": 1, "block_size": 32})
    refs = {q: reference(family, "cdpruner", RETENTION, question=q, image_indices=(0, 1)) for q in questions}
    expected = [refs[q][i]["tokens"] for i in (0, 1) for q in questions]
    assert [o["token_ids"] for o in out["outputs"]] == expected
    assert [o["token_ids"] for o in out["repeat_outputs"][0]] == expected
    assert all(refs[QUESTION][i]["kept"] != refs[OTHER_QUESTION][i]["kept"] for i in (0, 1))
