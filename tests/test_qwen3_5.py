"""Qwen3.5 (hybrid LLM: Gated DeltaNet linear attention, full attention every fourth layer) through dstp.

The hub-shaped fixture (tests/hub_fixture_qwen3_5.py) loads by id offline. Unpruned: greedy tokens identical to
transformers' `generate()` and logits within 1e-5 (float32), tokens identical in bfloat16, on one image, a batch
of three with different image sizes, two images in one message, and a text-only row beside an image row (left
padding reaches the linear-attention layers as transformers masks it). Pruned: what docs/hybrid.md offers (the
token leaves every layer from the prune point on, linear-attention ones included) against the model's own
layers and transformers' own cache on the physically shortened sequence (tests/hybrid_reference.py); DSTP
`store` against an unpruned prefill whose full-attention layers >= P are masked to the attended tokens. Refused:
one line naming the method and the family, before any model work."""
import copy

import pytest
import torch

import dstp
import hub_fixture_qwen3_5 as Q
from dstp import ConfigError, DSTPConfig, PruneConfig, VisionPulseConfig
from hub_fixtures import conversation, sample_images
from hybrid_reference import shortened_generate
from test_chat_hub import cases

NEW = 12

pytestmark = pytest.mark.skipif(not Q.available(), reason="transformers before 5.17 has no Qwen3.5 classes")


@pytest.fixture(scope="module")
def repo(hub_models):
    from conftest import HF_HUB_CACHE

    return Q.build(HF_HUB_CACHE)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pipe(request, repo):
    return dstp.load(repo, dtype=request.param)


def hf_generate(pipe, conversations):
    processor, model = pipe.processor, pipe.adapter.model
    inputs = processor.apply_chat_template(copy.deepcopy(conversations), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True, "padding_side": "left"})
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1).float()


@pytest.mark.parametrize("case", ["single", "batch3", "two_images", "mixed_text_only"])
def test_equals_transformers_generate(pipe, case):
    conversations = cases()[case]
    tokens, logits = hf_generate(pipe, conversations)
    prepared = pipe.prepare_chat(conversations)
    out = pipe.engine.generate(prepared, pipe.generation_config(NEW, {"do_sample": False}), return_logits=True)
    assert torch.equal(out.tokens, tokens)
    tol = 1e-5 if pipe.adapter.dtype == torch.float32 else 0.0  # bfloat16: the same kernels on the same shapes
    assert (out.logits - logits).abs().max() <= tol


def test_answers_depend_on_the_image(repo):
    pipe = dstp.load(repo)
    a, b = sample_images(2, seed=5, sizes=[(40, 40), (40, 40)])
    out = pipe.chat([conversation([a], "what is this"), conversation([b], "what is this")], max_new_tokens=6,
                    do_sample=False)
    assert not torch.equal(out.tokens[0], out.tokens[1])


def test_the_adapter_sees_the_hybrid_layout(repo):
    adapter = dstp.load(repo).adapter
    assert [i for i in range(adapter.n_layers) if not adapter.is_linear(i)] == [3, 7]
    assert adapter.family == "qwen3_5" and adapter.processor.tokenizer.__class__.__name__ == "Qwen3_5Tokenizer"


# -- pruning ---------------------------------------------------------------------------------------------------
def _batch():
    a, b, c = sample_images(3, seed=7, sizes=[(40, 40), (96, 64), (32, 72)])
    return [conversation([a], "describe it"), conversation([b, c], "compare the two pictures in a few words"),
            conversation([], "tell me a story about a cat")]


def _check_against_shortened_run(pipe, points):
    prepared = pipe.prepare_chat(_batch())
    out = pipe.engine.generate(prepared, pipe.generation_config(NEW, {"do_sample": False}), pruner=pipe.pruner,
                               return_logits=True)
    n_visual = out.trace.n_visual
    assert all(len(out.trace.kept[b]) < n for b, n in enumerate(n_visual) if n)  # something was pruned
    assert [layer for layer, _ in out.trace.stages] == list(points)
    tokens, logits = shortened_generate(pipe.adapter.model, prepared, out.trace.stages, NEW)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() <= (1e-5 if pipe.adapter.dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("method", ["random", "uniform", "divprune", "cdpruner"])
def test_pre_llm_pruners_equal_the_model_on_the_shortened_prompt(repo, method):
    pipe = dstp.load(repo, prune=PruneConfig(method, 0.3))
    assert pipe.pruner.layer == 0
    _check_against_shortened_run(pipe, [0])


def test_visionzip_runs_and_keeps_its_budget(repo):
    # VisionZip merges contextual tokens (new hidden states), so the shortened run of the kept tokens' own
    # embeddings is not its reference; its rule is tested in test_pruner_rules.py
    pipe = dstp.load(repo, prune=PruneConfig("visionzip", 0.3))
    out = pipe.chat(_batch(), max_new_tokens=4, do_sample=False)
    assert [len(k) for k in out.trace.kept] == [-(-n * 3 // 10) if n else 0 for n in out.trace.n_visual]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fastv_after_a_full_attention_layer_equals_the_shortened_run(repo, dtype):
    pipe = dstp.load(repo, prune=PruneConfig("fastv", 0.3, layer=4), dtype=dtype)  # ranks by layer 3 (full)
    _check_against_shortened_run(pipe, [4])


def test_pyramiddrop_at_full_attention_layers_equals_the_model_on_shortened_stages(repo):
    from dstp.pruners.pyramiddrop import PyramidDrop

    pipe = dstp.load(repo)
    pipe.pruner = PyramidDrop(PruneConfig("pyramiddrop", 0.3), pipe.adapter.n_layers, layers=(3, 7))
    pipe.adapter.check_methods(pipe.adapter.model.config, pipe.pruner)  # ranks by layers 3 and 7: full attention
    _check_against_shortened_run(pipe, [3, 7])


def test_sparsevlm_after_a_full_attention_layer_runs(repo):
    # SparseVLM recycles deleted tokens into cluster tokens (new hidden states): the shortened run of kept tokens
    # is not its reference; here it runs, ranking by layer 3 (full attention), and keeps fewer than it was given
    from dstp.pruners.sparsevlm import SparseVLM

    pipe = dstp.load(repo)
    pipe.pruner = SparseVLM(PruneConfig("sparsevlm", 0.3), pipe.adapter.n_layers, layers=(4,), fractions=(0.3,))
    pipe.adapter.check_methods(pipe.adapter.model.config, pipe.pruner)
    out = pipe.generate_prepared(pipe.prepare_chat(_batch()), pipe.generation_config(4, {"do_sample": False}))
    assert [s[0] for s in out.trace.stages] == [4]
    assert all(0 < len(k) < n for k, n in zip(out.trace.kept, out.trace.n_visual) if n)


# -- refusals --------------------------------------------------------------------------------------------------
REFUSED = [
    (dict(prune=PruneConfig("fastv", 0.3, layer=2)),
     "fastv at layer(s) [2] is not supported on qwen3_5: it ranks tokens by the attention of layer(s) [1], which "
     "are linear attention (full attention: layers [3, 7]; docs/hybrid.md)"),
    (dict(prune=PruneConfig("pyramiddrop", 0.3)),
     "pyramiddrop at layer(s) [2, 4, 6] is not supported on qwen3_5: it ranks tokens by the attention of "
     "layer(s) [2, 4, 6], which are linear attention (full attention: layers [3, 7]; docs/hybrid.md)"),
    (dict(prune=PruneConfig("fastv", 0.3, layer=4), shift=DSTPConfig(source="recompute")),
     "DSTP (source 'recompute') is not supported on qwen3_5: a revived token cannot enter its linear-attention "
     "layers' recurrent state without rerunning every token after it (docs/hybrid.md)"),
    (dict(prune=PruneConfig("random", 0.3), shift=DSTPConfig(source="store")),
     "DSTP with random at layer 0 is not supported on qwen3_5: it probes the attention of layer 0, which is linear "
     "attention (full attention: layers [3, 7]; docs/hybrid.md)"),
    (dict(prune=PruneConfig("fastv", 0.3, layer=4), shift=DSTPConfig(source="store", probe_layer=1)),
     "DSTP with fastv at layer 4 is not supported on qwen3_5: it probes the attention of layer 1, which is linear "
     "attention (full attention: layers [3, 7]; docs/hybrid.md)"),
    (dict(shift=VisionPulseConfig()),
     "VisionPulse is not supported on qwen3_5: its step reads a subset of every later layer's visual K/V, and its "
     "linear-attention layers keep a recurrent state instead (docs/hybrid.md)"),
]


@pytest.mark.parametrize("kwargs,message", REFUSED,
                         ids=["fastv-K2", "pyramiddrop", "dstp-recompute", "dstp-store-pre-llm", "dstp-store-probe",
                              "visionpulse"])
def test_refusals_are_one_line_before_the_weights_load(repo, monkeypatch, kwargs, message):
    import transformers

    def no_weights(*args, **kw):
        raise AssertionError("the weights were loaded before the refusal")

    monkeypatch.setattr(transformers.Qwen3_5ForConditionalGeneration, "from_pretrained", no_weights)
    with pytest.raises(ConfigError) as e:
        dstp.load(repo, **kwargs)
    assert str(e.value) == message


def test_sparsevlm_at_its_default_points_is_refused(repo):
    with pytest.raises(ConfigError, match=r"^sparsevlm at layer\(s\) \[2, 3, 5\] is not supported on qwen3_5: it ranks "
                                          r"tokens by the attention of layer\(s\) \[1, 2, 4\]"):
        dstp.load(repo, prune=PruneConfig("sparsevlm", 0.3))


def test_refusals_hold_for_a_wrapped_model(repo):
    pipe = dstp.load(repo)
    with pytest.raises(ConfigError, match="DSTP .* is not supported on qwen3_5"):
        dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig("fastv", 0.3, layer=4),
                        shift=DSTPConfig())


def test_cli_refusal_exits_2(repo, capsys):
    from dstp.lab.cli.main import main

    code = main(["generate", "--model", repo, "--prompt", "hi", "--prune", "fastv", "--retention", "0.3",
                 "--layer", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fastv at layer(s) [2] is not supported on qwen3_5" in err[0]


# -- the compiled step -----------------------------------------------------------------------------------------
def test_decode_step_compiles_to_one_graph(repo):
    """The linear-attention state updates in place (convolution window and recurrent state): the step compiles
    with fullgraph=True, once, and gives the eager step's tokens and logits; FastV at layer 4 + DSTP `store` runs
    an unpruned store (layers 0-3) and a pruned stage with a reserve (layers 4-7), each with linear layers."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from dstp import EngineConfig

    prune, shift = PruneConfig("fastv", 0.3, layer=4), DSTPConfig(source="store", force_every=3, window=2)
    conversations = _batch()
    eager = dstp.load(repo, prune=prune, shift=shift)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = dstp.load(repo, prune=prune, shift=shift, engine=EngineConfig(compile=True, compile_backend=counter))
    config = eager.generation_config(8, {"do_sample": False})
    a = eager.engine.generate(eager.prepare_chat(conversations), config, pruner=eager.pruner, shift=eager.policy,
                              return_logits=True)
    b = compiled.engine.generate(compiled.prepare_chat(conversations), config, pruner=compiled.pruner,
                                 shift=compiled.policy, return_logits=True)
    assert any(bool(s.shift.any()) for s in b.trace.steps)
    assert counter.frame_count == 1
    assert torch.equal(a.tokens, b.tokens) and (a.logits - b.logits).abs().max() < 1e-5


def test_state_memory_is_full_attention_kv_plus_fixed_recurrent_state(repo):
    """Only the full-attention layers (3, 7) hold K/V slots; each linear-attention layer holds a convolution window
    and a recurrent state of fixed size per row, whatever the prompt length (sizes from the config)."""
    pipe = dstp.load(repo)
    prepared = pipe.prepare_chat(_batch())
    out = pipe.engine.generate(prepared, pipe.generation_config(4, {"do_sample": False}))
    B, T = prepared.attention_mask.shape
    cfg = pipe.adapter.text_config
    slots = T + 4
    kv = 2 * 2 * B * cfg.num_key_value_heads * slots * cfg.head_dim * 4 + B * slots * (8 + 1)
    conv = B * (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
                + cfg.linear_num_value_heads * cfg.linear_value_head_dim) * cfg.linear_conv_kernel_dim * 4
    recurrent = B * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
    assert out.trace.memory_bytes["kv"] == kv + 6 * (conv + recurrent)


# -- the dense and MoE tiny models (dstp fidelity's) --------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tiny_dense_and_moe_equal_generate(moe):
    from dstp.config import GenerationConfig
    from dstp.engine.engine import Engine
    from dstp.lab.bench import tiny_models as tm
    from dstp.models.registry import adapter_for_model

    model = tm.tiny_qwen3_5(moe=moe)
    batch = tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])
    hf = model.generate(**batch, max_new_tokens=16, do_sample=False, output_logits=True,
                        return_dict_in_generate=True)
    adapter = adapter_for_model(model)
    assert adapter.family == ("qwen3_5_moe" if moe else "qwen3_5")
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=16), return_logits=True)
    assert torch.equal(out.tokens, hf.sequences[:, batch["input_ids"].shape[1]:])
    assert (out.logits - torch.stack(hf.logits, 1)).abs().max() < 1e-5


# -- the fixture itself ------------------------------------------------------------------------------------------
def test_fixture_renders_qwen3_5_chat_and_survives_a_reload(repo):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(repo)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    opened = processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True, tokenize=False)
    closed = processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True, tokenize=False,
                                           enable_thinking=False)
    head = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    assert opened == head + "<think>\n" and closed == head + "<think>\n\n</think>\n\n"
    built = Q._tokenizer()
    text = "café <think>\nthe sky is clear</think> 12 cats <|im_end|>"
    assert processor.tokenizer(text).input_ids == built(text).input_ids
    assert processor.tokenizer.convert_tokens_to_ids("<think>") not in processor.tokenizer.all_special_ids


# -- attention rows of the gated, partially rotated attention ------------------------------------------------------
def test_pruners_rank_by_transformers_eager_attention(repo):
    """FastV at 4 (the last prompt token's attention at layer 3, from the adapter's q and the cached keys) and
    PyramidDrop's first stage at 3 (layer 3's own q and k) keep the top visual tokens of transformers' own eager
    attention weights of layer 3 (the first full-attention layer)."""
    from dstp.engine.engine import Engine
    from dstp.engine.prune_context import topk_mask, visual_layout
    from dstp.pruners import get_pruner
    from dstp.pruners.pyramiddrop import PyramidDrop

    pipe = dstp.load(repo)
    batch = pipe.adapter.render_chat(copy.deepcopy(_batch()))
    prepared = pipe.adapter.prepare(batch)
    eager = copy.deepcopy(pipe.adapter.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(**batch, output_attentions=True).attentions[0][:, :, -1].mean(1)  # layer 3, last token
    pos, valid, _ = visual_layout(prepared.visual_mask)
    fastv = get_pruner(PruneConfig("fastv", 0.3, layer=4), pipe.adapter.n_layers)
    pyramid = PyramidDrop(PruneConfig("pyramiddrop", 0.3), pipe.adapter.n_layers, layers=(3, 7))
    for pruner in (fastv, pyramid):
        state, _, _, _ = Engine(pipe.adapter).prefill(prepared, 2, pruner=pruner)
        kept = state.stages[0].kept
        assert bool((kept.sum(-1) < valid.sum(-1))[valid.any(-1)].all())
        assert torch.equal(kept, topk_mask(att.gather(1, pos), valid, kept.sum(-1)))


# -- DSTP, store source ------------------------------------------------------------------------------------------
def test_dstp_store_equals_an_unpruned_prefill_with_masked_full_attention(repo):
    """FastV at 4 + DSTP `store` (forced shifts): the engine's tokens and logits equal the model's own layers with
    transformers' cache on the unpruned prompt, decoding with the full-attention layers >= 4 masked to the text,
    the kept visual tokens and the ones the engine revived at that step (read from its store), and the
    linear-attention layers carrying the unpruned prompt's state. Without the revived tokens the logits differ."""
    from hybrid_reference import store_source_generate

    pipe = dstp.load(repo, prune=PruneConfig("fastv", 0.3, layer=4),
                     shift=DSTPConfig(source="store", force_every=3, window=2))
    prepared = pipe.prepare_chat(_batch())
    text = prepared.attention_mask & ~prepared.visual_mask
    attended, kept_only, step = [], [], pipe.policy.step

    def recording_step(pstate, state, q_probe, noise):
        out = step(pstate, state, q_probe, noise)
        s = state.pruned
        keys = text.scatter(1, state.visual_pos, (state.kept & state.visual_valid) | text.gather(1, state.visual_pos))
        tags = s.reserve_tags().clamp(max=keys.shape[1] - 1)  # free slots (NEVER) are not valid
        attended.append(keys.scatter(1, tags, s.valid[:, :s.reserve] | keys.gather(1, tags)))
        kept_only.append(keys)
        return out

    pipe.policy.step = recording_step
    out = pipe.engine.generate(prepared, pipe.generation_config(NEW, {"do_sample": False}), pruner=pipe.pruner,
                               shift=pipe.policy, return_logits=True)
    assert sum(len(r) for s in out.trace.steps for r in s.revived) > 0  # tokens were revived
    tokens, logits = store_source_generate(pipe.adapter.model, prepared, 4, attended, NEW)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() < 1e-5
    _, without = store_source_generate(pipe.adapter.model, prepared, 4, kept_only, NEW)
    assert (out.logits - without).abs().max() > 1e-3


def test_published_text_config_at_full_width_equals_generate():
    """The LLM of Qwen/Qwen3.5-0.8B's text_config (as public code mirrors its config.json) at full width: hidden
    1024, head_dim 256 with 64 rotated, M-RoPE sections [11, 11, 10], 16 linear key/value heads of 128, conv kernel
    4, tied embeddings, rope theta 1e7; 4 of its 24 layers (3 linear, 1 full), a small vocabulary, a tiny vision
    tower. Greedy tokens equal `generate()`, logits agree to 1e-4 (float32, random weights N(0, 0.02))."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from dstp.config import GenerationConfig
    from dstp.engine.engine import Engine
    from dstp.lab.bench import tiny_models as tm
    from dstp.models.registry import adapter_for_model

    text = dict(vocab_size=2048, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                max_position_embeddings=262144, tie_word_embeddings=True, pad_token_id=0,
                layer_types=["linear_attention"] * 3 + ["full_attention"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000000, "mrope_section": [11, 11, 10],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=1024, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=tm.IMAGE_TOKEN, video_token_id=101,
                        vision_start_token_id=102, vision_end_token_id=103, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    batch = tm.qwen_batch([(8, 8), (4, 8)], [3, 1])
    hf = model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    adapter = adapter_for_model(model)
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=8), return_logits=True)
    assert torch.equal(out.tokens, hf.sequences[:, batch["input_ids"].shape[1]:])
    assert (out.logits - torch.stack(hf.logits, 1)).abs().max() < 1e-4
