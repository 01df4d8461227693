"""Gemma 4 (`Gemma4ForConditionalGeneration`) on a tiny random model with the released layout: five sliding layers
(window 8, prompts of 15-130 tokens) and a global one with its own head size and K/V heads, proportional partial
rotary, soft-capped logits, images attended both ways at sliding layers. Against transformers' generate() unpruned
and an independent masked reference (transformers' own layers, its SDPA path) pruned; every pruner and DSTP."""
import pytest
import torch

import transformers
from dstp.config import DSTPConfig, EngineConfig, GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.errors import UnsupportedModelError
from dstp.models.gemma4 import Gemma4Adapter, image_blocks
from dstp.models.registry import adapter_for_model
from dstp.pruners import PRUNERS, get_pruner
from dstp.shift import ShiftPolicy
from test_engine import FixedPruner
from test_shift import kept_sets
from dstp.lab.bench import tiny_models as tm

pytestmark = pytest.mark.skipif(not hasattr(transformers, "Gemma4ForConditionalGeneration"),
                                reason=f"transformers {transformers.__version__} has no Gemma 4 (5.17, the floor, has it)")

ROWS = ([[(32, 32)], [(24, 40), (40, 24)], []], [3, 1, 6])  # one image; two of other shapes; text only


@pytest.fixture(scope="module")
def gemma():
    model = tm.tiny_gemma4()
    return model, adapter_for_model(model), tm.gemma4_batch(*ROWS)


def generate_both(model, adapter, batch, n=16):
    hf = model.generate(**batch, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=n), return_logits=True)
    return out, hf.sequences[:, batch["input_ids"].shape[1]:], torch.stack(hf.logits, 1)


def test_layout_is_gemma_4s(gemma):
    model, adapter, batch = gemma
    assert [adapter.sliding_window(i) for i in range(6)] == [8] * 5 + [None]
    assert [(adapter.kv_heads(i), adapter.kv_head_dim(i)) for i in (0, 5)] == [(2, 16), (1, 32)]
    counts = (batch["input_ids"] == 100).sum(-1).tolist()
    assert counts[0] > 0 and counts[1] > counts[0] and counts[2] == 0  # image tokens: one image, two, none
    assert int(batch["attention_mask"].sum(-1).min()) > 8


def test_equals_generate_float32(gemma):
    """One image, two images of other shapes in one message, a text-only row, left padding: greedy tokens identical,
    logits within 1e-5."""
    model, adapter, batch = gemma
    out, tokens, logits = generate_both(model, adapter, batch)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() < 1e-5


def test_equals_generate_bfloat16():
    model = tm.tiny_gemma4().to(torch.bfloat16)
    batch = tm.gemma4_batch(*ROWS)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out, tokens, logits = generate_both(model, adapter_for_model(model), batch, n=12)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() < 0.05  # bf16 rounding (0.008 measured)


def test_mixture_of_experts_equals_generate():
    """The 26B-A4B layout: a routed MoE block beside the MLP in every layer."""
    model = tm.tiny_gemma4(moe=True)
    out, tokens, logits = generate_both(model, adapter_for_model(model), tm.gemma4_batch(*ROWS), n=10)
    assert torch.equal(out.tokens, tokens) and (out.logits - logits).abs().max() < 1e-5


def test_images_attend_both_ways_only_at_sliding_layers(gemma):
    """Without the image blocks (plain causal sliding layers) the logits move: the test above could fail."""
    model, adapter, batch = gemma
    prepared = adapter.prepare(batch)
    assert image_blocks(prepared.visual_mask)[1].max() == 1  # two images in row 1: two blocks
    ours = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=4), return_logits=True)
    prepared.attention_blocks = None
    causal = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=4), return_logits=True)
    assert (ours.logits[:2] - causal.logits[:2]).abs().max() > 1e-3


# -- pruned runs against an independent reference --------------------------------------------------------------
@torch.no_grad()
def reference_logits(model, adapter, prepared, P: int, dropped: torch.Tensor, steps: int):
    """Greedy logits [B, steps, V] from the whole sequence each step, no cache, through transformers' own decoder
    layers and rotary (its SDPA path, with a mask): layers >= P do not see `dropped` [B, T]; sliding layers see keys
    in their window and, inside an image, later keys of the same image; global layers are causal."""
    lm, cfg = model.model.language_model, model.config.get_text_config()
    h0, valid, W = prepared.inputs_embeds, prepared.attention_mask, cfg.sliding_window
    B, T, _ = h0.shape
    blocks = image_blocks(prepared.visual_mask)
    out, tokens = [], []
    for _ in range(steps):
        new = torch.stack(tokens, 1) if tokens else torch.zeros(B, 0, dtype=torch.long)
        h = torch.cat([h0, adapter.embed_tokens(new)], 1)
        n = h.shape[1]
        pos = torch.cat([prepared.position_ids, prepared.next_position[:, None] + torch.arange(n - T)], 1)
        v = torch.cat([valid, torch.ones(B, n - T, dtype=torch.bool)], 1)
        d = torch.cat([dropped, torch.zeros(B, n - T, dtype=torch.bool)], 1)
        blk = torch.cat([blocks, torch.full((B, n - T), -1)], 1)
        q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
        causal = (k <= q)[None] & v[:, None, :]
        same = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0) & v[:, None, :]
        eye = torch.eye(n, dtype=torch.bool)[None]
        masks = {"full_attention": causal | eye, "sliding_attention": ((causal | same) & (k > q - W)) | eye}
        rope = {t: lm.rotary_emb(h, pos, t) for t in set(cfg.layer_types)}
        for i, layer in enumerate(lm.layers):
            kind = cfg.layer_types[i]
            m = masks[kind] & ~d[:, None, :] | eye if i >= P else masks[kind]
            h = layer(h, None, shared_kv_states={}, position_embeddings=rope[kind], attention_mask=m[:, None])
            h = h[0] if isinstance(h, tuple) else h
        logits = model.lm_head(lm.norm(h[:, -1]))
        cap = cfg.final_logit_softcapping
        logits = (torch.tanh(logits / cap) * cap).float()
        out.append(logits)
        tokens.append(logits.argmax(-1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("P", [0, 2])
def test_pruned_equals_masked_reference(gemma, P):
    """Kept tokens keep their original indices: windows and image blocks are the unpruned run's."""
    model, adapter, batch = gemma
    prepared = adapter.prepare(batch)
    kept = kept_sets(prepared)
    out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=6), pruner=FixedPruner(P, kept),
                                   return_logits=True)
    dropped = torch.zeros_like(prepared.visual_mask)
    for b, keep in enumerate(kept):
        vis = torch.nonzero(prepared.visual_mask[b]).flatten()
        gone = torch.ones(len(vis), dtype=torch.bool)
        gone[keep] = False
        dropped[b, vis[gone]] = True
    ref = reference_logits(model, adapter, prepared, P, dropped, steps=6)
    assert (out.logits - ref).abs().max() < 1e-5


def test_store_source_reviving_every_token_equals_unpruned(gemma):
    model, adapter, batch = gemma
    engine = Engine(adapter)
    prepared = adapter.prepare(batch)
    full = engine.generate(prepared, GenerationConfig(max_new_tokens=8), return_logits=True)
    policy = ShiftPolicy(DSTPConfig(variant="all_tokens", source="store", window=8, force_every=100), 2)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=8), pruner=FixedPruner(2, kept_sets(prepared)),
                          shift=policy, return_logits=True)
    assert torch.equal(out.tokens, full.tokens) and (out.logits - full.logits).abs().max() < 1e-5


# -- every pruner, DSTP with both sources, the compiled step ----------------------------------------------------
RUNS = [m for m in sorted(PRUNERS) if m != "oracle" and not PRUNERS[m].video_only]  # evs: tests/test_evs.py


@pytest.mark.parametrize("method", RUNS)
@pytest.mark.parametrize("source", [None, "store", "recompute"])
def test_every_pruner_and_dstp_source_runs(gemma, method, source):
    model, adapter, batch = gemma
    prepared = adapter.prepare(batch, vision_scores=method == "visionzip")
    pruner = get_pruner(PruneConfig(method, 0.333), adapter.n_layers)
    policy = ShiftPolicy(DSTPConfig(source=source, force_every=2, window=2, variant="random"), pruner.layer) \
        if source else None
    out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=5), pruner=pruner, shift=policy)
    kept, n = [len(k) for k in out.trace.kept], prepared.n_visual.tolist()
    assert 0 < kept[0] < n[0] and 0 < kept[1] < n[1] and kept[2] == n[2] == 0
    if source:
        assert any(bool(s.shift[:2].any()) for s in out.trace.steps)


def test_vision_scores_are_the_towers_own_attention(gemma):
    """VisionZip's stand-in for CLS attention: the mean attention each pooled token's patches receive in the last
    encoder layer, equal to what the tower itself returns with output_attentions (eager attention)."""
    model, adapter, batch = gemma
    vision = adapter.prepare(batch).vision
    tower, positions = model.model.vision_tower, batch["image_position_ids"]
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attentions = tower(pixel_values=batch["pixel_values"], pixel_position_ids=positions,
                               output_attentions=True).attentions[-1]  # [images, H, P, P]
    finally:
        tower.config._attn_implementation = "sdpa"
    valid, units = (positions != -1).all(-1), adapter.patch_units(positions)
    for i in range(attentions.shape[0]):
        received = attentions[i][:, valid[i]][:, :, valid[i]].mean((0, 1))
        u = units[i][valid[i]]
        n = int(vision.valid[i].sum())
        expected = torch.zeros(n).index_add_(0, u, received) / torch.zeros(n).index_add_(0, u, torch.ones_like(received))
        assert n == int(u.max()) + 1 and torch.allclose(vision.scores[i, :n], expected, atol=1e-6)
    assert vision.hidden.shape[-1] == model.config.vision_config.hidden_size


def test_compiled_step_is_one_graph(gemma):
    from torch._dynamo.testing import CompileCounter

    model, adapter, batch = gemma
    prepared = adapter.prepare(batch, vision_scores=False)
    pruner = get_pruner(PruneConfig("fastv", 0.333), adapter.n_layers)
    runs = []
    for config in (EngineConfig(), EngineConfig(compile=True, compile_backend=CompileCounter())):
        torch._dynamo.reset()
        policy = ShiftPolicy(DSTPConfig(source="recompute", force_every=2, window=2, variant="random"), pruner.layer)
        runs.append(Engine(adapter, config).generate(prepared, GenerationConfig(max_new_tokens=8), pruner=pruner,
                                                     shift=policy, return_logits=True))
        counter = config.compile_backend
    assert counter.frame_count == 1
    assert torch.equal(runs[0].tokens, runs[1].tokens) and (runs[0].logits - runs[1].logits).abs().max() < 1e-5


# -- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,phrase", [
    ("hidden_size_per_layer_input", 256, "per-layer embeddings"),
    ("num_kv_shared_layers", 20, "K/V shared across layers"),
    ("use_bidirectional_attention", "all", "use_bidirectional_attention='all'"),
])
def test_e2b_e4b_features_are_refused_in_one_line(field, value, phrase):
    with pytest.raises(UnsupportedModelError, match=f"^dstp's Gemma 4 adapter does not support {phrase}"):
        Gemma4Adapter.check_config({"text_config": {field: value}})


def test_audio_and_video_inputs_are_refused(gemma):
    model, adapter, batch = gemma
    with pytest.raises(Exception, match="takes images only; these inputs hold audio"):
        adapter.prepare({**batch, "input_features": torch.zeros(1, 4, 8)})


# -- the hub-shaped fixture ------------------------------------------------------------------------------------
RICH = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "What is in the image?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And the second?"}]
RENDERED = ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n<|image|><|image|>What is in the image?<turn|>\n"
            "<|turn>model\nA cat.<turn|>\n<|turn>user\nAnd the second?<turn|>\n<|turn>model\n"
            "<|channel>thought\n<channel|>")


def test_hub_fixture_has_gemma_4s_classes_tokens_and_template(hub_models):
    import copy

    from transformers import AutoProcessor, AutoTokenizer
    import hub_fixtures as H

    repo = hub_models["gemma4"]
    processor = AutoProcessor.from_pretrained(repo)
    assert [type(x).__name__ for x in (processor, processor.image_processor, processor.video_processor,
                                       processor.feature_extractor, processor.tokenizer)] == [
        "Gemma4Processor", "Gemma4ImageProcessor", "Gemma4VideoProcessor", "Gemma4AudioFeatureExtractor",
        "GemmaTokenizer"]
    tok, built = AutoTokenizer.from_pretrained(repo), H._tokenizer("gemma4")
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    assert (tok.image_token, tok.boi_token, tok.eoi_token, tok.eot_token) == ("<|image|>", "<|image>", "<image|>",
                                                                             "<turn|>")
    for text in ("Hello world, what is in the picture?", "café, naïve, 東京 🙂", "a\ttab and a new\nline "):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == built.encode(text, add_special_tokens=False) and tok.decode(ids) == text
    for special in ("<|turn>", "<turn|>", "<|image|>", "<|image>", "<image|>", "<|video|>", "<|channel>"):
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
    assert processor.apply_chat_template(copy.deepcopy(RICH), tokenize=False, add_generation_prompt=True) == RENDERED
    image = H.sample_images(1, 3, [(40, 40)])
    inputs = processor.apply_chat_template([H.conversation(image, "Describe it.")], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    ids, image_id = inputs["input_ids"][0].tolist(), tok.image_token_id
    first = ids.index(image_id)
    assert ids[first - 1] == tok.convert_tokens_to_ids("<|image>") and 0 < ids.count(image_id) <= 70
    assert ids[first + ids.count(image_id)] == tok.convert_tokens_to_ids("<image|>")


def test_an_e2b_style_checkpoint_is_refused_before_its_weights_load(hub_models, tmp_path):
    import json
    import shutil

    import dstp
    import hub_fixtures as H
    from conftest import HF_HUB_CACHE

    copy_dir = tmp_path / "e2b-like"
    shutil.copytree(H.snapshot_dir(HF_HUB_CACHE, hub_models["gemma4"]), copy_dir)
    config = json.loads((copy_dir / "config.json").read_text())
    config["text_config"]["hidden_size_per_layer_input"] = 256
    (copy_dir / "config.json").write_text(json.dumps(config))
    (copy_dir / "model.safetensors").unlink()  # no weights: the refusal must come first
    with pytest.raises(UnsupportedModelError, match="per-layer embeddings"):
        dstp.load(str(copy_dir))
