"""Video on the families after Qwen2.5-VL / Qwen3-VL (tests/test_video.py's clips and reference).

Qwen3.5 (hub fixture tests/hub_fixture_qwen3_5.py, hybrid LLM): tokens equal transformers' `generate()` on the
processor's own output (float32 and bfloat16; a clip alone, a clip beside an image, a 48-frame clip); pruners
before the LLM (random, evs) and FastV after the first full-attention layer (layer 4, ranking by layer 3) on
video tokens equal the model's own layers on the physically shortened sequence (tests/hybrid_reference.py)."""
import pytest
import torch

import dstp
import hub_fixture_qwen3_5 as Q
from dstp import PruneConfig
from hybrid_reference import shortened_generate
from test_video import NEW, frames_batch, reference_tokens

qwen3_5 = pytest.mark.skipif(not Q.available(), reason="transformers before 5.17 has no Qwen3.5 classes")


@pytest.fixture(scope="module")
def qwen3_5_repo(hub_models):
    from conftest import HF_HUB_CACHE

    return Q.build(HF_HUB_CACHE)


@qwen3_5
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qwen3_5_video_equals_transformers_generate(qwen3_5_repo, dtype):
    pipe = dstp.load(qwen3_5_repo, dtype=dtype)
    conversations = frames_batch()
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, conversations))
    prepared = pipe.prepare_chat(conversations)
    video = prepared.input_ids == pipe.adapter.model.config.video_token_id
    assert bool(video.any()) and torch.equal(prepared.visual_mask & video, video)
    assert int(prepared.video.frame.max()) >= 1


@qwen3_5
def test_qwen3_5_answers_depend_on_the_clip(qwen3_5_repo):
    pipe = dstp.load(qwen3_5_repo)
    a, b = frames_batch()[0], frames_batch()[2]
    b[0]["content"][-1]["text"] = a[0]["content"][-1]["text"]
    out = pipe.chat([a, b], max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(out.tokens[0], out.tokens[1])


@qwen3_5
@pytest.mark.parametrize("method, layer", [("random", 0), ("evs", 0), ("fastv", 4)])
def test_qwen3_5_pruners_on_video_equal_the_shortened_run(qwen3_5_repo, method, layer):
    pipe = dstp.load(qwen3_5_repo, prune=PruneConfig(method, 0.3, layer=layer, seed=1))
    prepared = pipe.prepare_chat(frames_batch())
    out = pipe.engine.generate(prepared, pipe.generation_config(NEW, {"do_sample": False}), pruner=pipe.pruner,
                               return_logits=True)
    assert [s[0] for s in out.trace.stages] == [layer]
    kept, n = [len(k) for k in out.trace.kept], out.trace.n_visual
    assert all(0 < k <= v for k, v in zip(kept, n)) and kept[2] < n[2]  # evs keeps a one-frame clip whole
    tokens, logits = shortened_generate(pipe.adapter.model, prepared, out.trace.stages, NEW)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() <= 1e-5
