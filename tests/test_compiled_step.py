"""The decoding step under torch.compile(fullgraph=True): no graph break for unpruned, the pruners (single-stage in
the LLM, before it, multi-stage) and DSTP with both sources, batches with padding; no recompilation after warm-up
but one per KV capacity bucket, counted with dynamo's own compile counter; the same tokens as the eager engine and
generate(); no host read inside a step."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from dstp import DSTPConfig, EngineConfig, PruneConfig
from dstp.config import GenerationConfig
from dstp.engine import kv_store
from dstp.engine.engine import Engine
from dstp.errors import ConfigError
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.shift import ShiftPolicy
from dstp.lab.bench import tiny_models as tm


@pytest.fixture(scope="module")
def llava():
    model = tm.tiny_llava(layers=4)
    model.config.text_config.max_position_embeddings = 2048  # room for 512 new tokens (rotary is computed)
    adapter = adapter_for_model(model)
    return model, adapter, adapter.prepare(tm.llava_batch([3, 7, 1]))


def run(adapter, prepared, engine_config, method=None, source=None, n=12, **gen):
    torch._dynamo.reset()
    engine = Engine(adapter, engine_config)
    pruner = get_pruner(PruneConfig(method, 0.333), adapter.n_layers) if method else None
    policy = ShiftPolicy(DSTPConfig(source=source, force_every=3, window=2, variant="random"), pruner.layer) \
        if source else None
    relevant = prepared.visual_mask.new_ones(prepared.inputs_embeds.shape[0], int(prepared.n_visual.max())) \
        if method == "oracle" else None
    relevant = relevant if relevant is None else relevant.index_fill(1, torch.arange(0, relevant.shape[1], 2), False)
    return engine.generate(prepared, GenerationConfig(max_new_tokens=n, **gen), pruner=pruner, shift=policy,
                           relevant=relevant, return_logits=True)


CASES = [(None, None), ("fastv", None), ("fastv", "store"), ("fastv", "recompute"), ("divprune", "recompute"),
         ("visionzip", "store"), ("sparsevlm", "recompute"), ("pyramiddrop", "store"), ("cdpruner", None),
         ("random", "recompute"), ("uniform", None), ("oracle", "store")]


ONE_ROW = [(None, None), ("fastv", "store"), ("sparsevlm", "recompute"), ("visionzip", "recompute")]


@pytest.mark.parametrize("method,source,batch", [(*case, "padded") for case in CASES] +
                         [(*case, "one") for case in ONE_ROW])
def test_one_graph_and_eager_tokens(llava, method, source, batch):
    """fullgraph=True fails on any graph break; the compiled step (dynamo's graph, run as traced) gives the eager
    step's tokens and logits; a batch of three rows with left padding, and one row."""
    _, adapter, prepared = llava
    if batch == "one":
        prepared = adapter.prepare(tm.llava_batch([4]))
    counter = CompileCounter()
    eager = run(adapter, prepared, EngineConfig(), method, source)
    compiled = run(adapter, prepared, EngineConfig(compile=True, compile_backend=counter), method, source)
    assert counter.frame_count == 1
    assert torch.equal(eager.tokens, compiled.tokens)
    assert (eager.logits - compiled.logits).abs().max() < 1e-5
    if source:
        assert any(bool(s.shift.any()) for s in compiled.trace.steps)
        assert compiled.trace.steps[3].revived == eager.trace.steps[3].revived


def test_512_steps_recompile_once_per_capacity_bucket(llava):
    """512 steps of FastV + DSTP (recompute) with forced shifts every 5 steps, windows of 3, and rows that stop at
    different steps (one never does): the step compiles once, then once more when the stores first grow past their
    first chunk (the capacity becomes a dynamic size), and never again (GROW_CHUNK = 256: the buckets are
    prompt + 256 and prompt + 512 slots)."""
    _, adapter, prepared = llava
    pruner = get_pruner(PruneConfig("fastv", 0.333), adapter.n_layers)
    policy = ShiftPolicy(DSTPConfig(force_every=5, window=3, variant="random"), pruner.layer)
    free = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=512, stop_token_ids=()), pruner=pruner,
                                    shift=policy).tokens
    # stop tokens that end rows 0 and 1 at different steps and never occur in row 2
    stops = [next(int(t) for t in free[b] if int(t) not in free[2].tolist()) for b in (0, 1)]
    ends = [free[b].tolist().index(stops[b]) + 1 for b in (0, 1)]
    assert ends[0] != ends[1]
    counter = CompileCounter()
    torch._dynamo.reset()
    engine = Engine(adapter, EngineConfig(compile=True, compile_backend=counter))
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=512, stop_token_ids=tuple(stops)), pruner=pruner,
                          shift=policy)
    assert out.trace.new_tokens == [ends[0], ends[1], 512] and len(out.trace.steps) == 511
    assert torch.equal(out.tokens[2], free[2])
    assert sum(bool(s.shift.any()) for s in out.trace.steps) >= 100
    assert counter.frame_count == 2
    assert kv_store.GROW_CHUNK == 256


def test_compiled_with_inductor_equals_generate(llava):
    """The default backend (inductor, C++ on CPU): greedy tokens equal transformers' generate(), logits within the
    eager engine's tolerance."""
    model, adapter, prepared = llava
    batch = tm.llava_batch([3, 7, 1])
    hf = model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = run(adapter, prepared, EngineConfig(compile=True), n=8)
    assert torch.equal(out.tokens, hf.sequences[:, batch["input_ids"].shape[1]:])
    assert (out.logits - torch.stack(hf.logits, 1)).abs().max() < 1e-4


def test_sampling_compiles_and_is_seeded(llava):
    _, adapter, prepared = llava
    cfg = dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=5)
    eager = run(adapter, prepared, EngineConfig(), "fastv", "store", **cfg)
    compiled = run(adapter, prepared, EngineConfig(compile=True, compile_backend="eager"), "fastv", "store", **cfg)
    again = run(adapter, prepared, EngineConfig(), "fastv", "store", **{**cfg, "seed": 6})
    assert torch.equal(eager.tokens, compiled.tokens) and not torch.equal(eager.tokens, again.tokens)


@pytest.mark.parametrize("every", [1, 3, 64])
def test_stop_check_interval_changes_nothing(llava, every):
    """Rows that stopped between two checks run on; what they generate after their stop is cut off."""
    _, adapter, prepared = llava
    free = run(adapter, prepared, EngineConfig(), "fastv", "recompute", n=24, stop_token_ids=()).tokens
    stops = (int(free[0, 2]), int(free[1, 6]), int(free[2, 9]))
    base = run(adapter, prepared, EngineConfig(stop_check_every=1), "fastv", "recompute", n=24,
               stop_token_ids=stops)
    out = run(adapter, prepared, EngineConfig(stop_check_every=every), "fastv", "recompute", n=24,
              stop_token_ids=stops)
    assert max(base.trace.new_tokens) < 24  # every row stopped early
    assert torch.equal(out.tokens, base.tokens) and out.trace.new_tokens == base.trace.new_tokens
    assert len(out.trace.steps) == len(base.trace.steps) == max(base.trace.new_tokens) - 1
    assert out.trace.decode_flops == base.trace.decode_flops
    assert [s.revived for s in out.trace.steps] == [s.revived for s in base.trace.steps]


def test_bad_engine_options_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="stop_check_every must be an integer >= 1, got 0"):
        EngineConfig(stop_check_every=0)
    with pytest.raises(ConfigError, match="compile must be True or False"):
        EngineConfig(compile="yes")


def test_unknown_compile_backend_is_one_line(llava):
    _, adapter, _ = llava
    with pytest.raises(ConfigError, match="unknown torch.compile backend 'inductr'"):
        Engine(adapter, EngineConfig(compile=True, compile_backend="inductr"))


def test_compile_refused_where_torch_cannot_compile(llava, monkeypatch):
    """No C++ compiler for inductor on CPU: one line, unless the user asked to fall back to the eager step."""
    import shutil

    from dstp.engine import step_compiler

    _, adapter, _ = llava
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="compile=True on CPU needs a C\\+\\+ compiler"):
        Engine(adapter, EngineConfig(compile=True))
    engine = Engine(adapter, EngineConfig(compile=True, compile_fallback=True))
    assert not engine.compiled and engine._step == engine.step
    assert step_compiler.check_can_compile(torch.device("cpu"), "eager") is None  # other backends need none


@pytest.mark.parametrize("make", [tm.tiny_qwen3_vl, tm.tiny_qwen3_vl_moe], ids=["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_vl_compiles_with_m_rope_and_deepstack(make):
    """Qwen3-VL (3-axis M-RoPE positions, DeepStack features in early layers) and Qwen3-VL-MoE (top-k experts in
    every LLM layer but one): FastV + DSTP recompute compiles to one graph and gives the eager step's tokens."""
    adapter = adapter_for_model(make())
    prepared = adapter.prepare(tm.qwen3_vl_batch([(8, 8), (4, 8)], [3, 1]))
    counter = CompileCounter()
    eager = run(adapter, prepared, EngineConfig(), "fastv", "recompute", n=8)
    compiled = run(adapter, prepared, EngineConfig(compile=True, compile_backend=counter), "fastv", "recompute", n=8)
    assert counter.frame_count == 1
    assert torch.equal(eager.tokens, compiled.tokens) and (eager.logits - compiled.logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_visionpulse_compiles_to_one_graph(llava, family):
    """VisionPulse (a fresh selection at the anchor layer every step, a wide budget so that it varies): one graph,
    the eager step's tokens, logits and per-step selections; a padded batch (LLaVA) and M-RoPE + DeepStack."""
    from dstp import VisionPulseConfig
    from dstp.policy import make_policy

    if family == "llava":
        _, adapter, prepared = llava
    else:
        adapter = adapter_for_model(tm.tiny_qwen3_vl())
        prepared = adapter.prepare(tm.qwen3_vl_batch([(8, 8), (4, 8)], [3, 1]))
    config = VisionPulseConfig(anchor_layer=2, visual_mass_tau=1.0, budget_min=0.05, budget_max=0.9)

    def go(engine_config):
        torch._dynamo.reset()
        policy = make_policy(config, None, adapter.n_layers)
        return Engine(adapter, engine_config).generate(prepared, GenerationConfig(max_new_tokens=10), shift=policy,
                                                       return_logits=True)

    counter = CompileCounter()
    eager = go(EngineConfig())
    compiled = go(EngineConfig(compile=True, compile_backend=counter))
    assert counter.frame_count == 1
    assert torch.equal(eager.tokens, compiled.tokens) and (eager.logits - compiled.logits).abs().max() < 1e-5
    for e, c in zip(eager.trace.steps, compiled.trace.steps):
        assert torch.equal(e.selected_mask, c.selected_mask) and torch.equal(e.visual_attended, c.visual_attended)
    assert len({tuple(s.visual_attended.tolist()) for s in eager.trace.steps}) > 1  # the budget moved


@pytest.mark.parametrize("source", [None, "store", "recompute"])
def test_sliding_window_compiles_to_one_graph(source):
    """A window of 8 on Qwen2.5-VL's layers 1-3 (prompts of 15-25 tokens): the compiled step masks its sliding layers
    by the new token's original index (a tensor), compiles to one graph and gives the eager step's tokens, which
    equal generate()'s unpruned."""
    model = tm.tiny_qwen2_5_vl(window=8)
    adapter = adapter_for_model(model)
    batch = tm.qwen_batch([(8, 8), (4, 8)], [3, 1])
    prepared = adapter.prepare(batch)
    method = "fastv" if source else None
    counter = CompileCounter()
    eager = run(adapter, prepared, EngineConfig(), method, source, n=10)
    compiled = run(adapter, prepared, EngineConfig(compile=True, compile_backend=counter), method, source, n=10)
    assert counter.frame_count == 1
    assert torch.equal(eager.tokens, compiled.tokens) and (eager.logits - compiled.logits).abs().max() < 1e-5
    if source is None:
        hf = model.generate(**batch, max_new_tokens=10, do_sample=False)
        assert torch.equal(compiled.tokens, hf[:, batch["input_ids"].shape[1]:])
