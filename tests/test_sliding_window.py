"""Sliding-window layers are enforced (docs/sliding-window.md): a window of 8 tokens on prompts of 25-40, against
transformers' generate() unpruned, a masked reference pruned, and DSTP's contracts with revived tokens."""
import pytest
import torch

from dstp.config import DSTPConfig, GenerationConfig
from dstp.engine.attention import CAUSAL, Attention
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.shift import ShiftPolicy
from reference import masked_reference_logits
from test_engine import FixedPruner
from test_shift import kept_sets, run
from dstp.lab.bench import tiny_models as tm

WINDOW = 8
FAMILIES = {
    "qwen2_5_vl": (lambda: tm.tiny_qwen2_5_vl(window=WINDOW),
                   lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "internvl": (lambda: tm.tiny_internvl(window=WINDOW), lambda: tm.internvl_batch([1, 2, 1], [4, 1, 6])),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    make, batch = FAMILIES[request.param]
    model = make()
    adapter = adapter_for_model(model)
    return model, adapter, batch()


def test_the_config_has_sliding_layers_and_prompts_outrun_the_window(family):
    model, adapter, batch = family
    assert [adapter.sliding_window(i) for i in range(adapter.n_layers)] == [None] + [WINDOW] * 3
    assert adapter.window == WINDOW
    assert int(batch["attention_mask"].sum(-1).min()) > WINDOW


def test_unpruned_equals_generate_and_the_window_matters(family):
    """Tokens identical to transformers' generate() (which masks its sliding layers); the same engine with the window
    ignored gives other logits, so the test could fail."""
    model, adapter, batch = family
    hf = model.generate(**batch, max_new_tokens=16, do_sample=False, output_logits=True,
                        return_dict_in_generate=True)
    hf_tokens = hf.sequences[:, batch["input_ids"].shape[1]:]
    prepared = adapter.prepare(batch)
    out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=16), return_logits=True)
    assert torch.equal(out.tokens, hf_tokens)
    assert (out.logits - torch.stack(hf.logits, 1)).abs().max() < 1e-5

    class NoWindow(type(adapter)):
        def sliding_window(self, layer_idx):
            return None

    blind = Engine(NoWindow(model)).generate(prepared, GenerationConfig(max_new_tokens=16), return_logits=True)
    assert (blind.logits - out.logits).abs().max() > 1e-2


@pytest.mark.parametrize("P", [0, 2])
def test_pruned_equals_windowed_masked_reference(family, P):
    """Kept tokens keep their original indices, so the window is the unpruned run's; decoding 8 steps moves every
    query's window along."""
    model, adapter, batch = family
    prepared = adapter.prepare(batch)
    kept = kept_sets(prepared)
    out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=8), pruner=FixedPruner(P, kept),
                                   return_logits=True)
    dropped = torch.zeros_like(prepared.visual_mask)
    for b, keep in enumerate(kept):
        vis = torch.nonzero(prepared.visual_mask[b]).flatten()
        mask = torch.ones(len(vis), dtype=torch.bool)
        mask[keep] = False
        dropped[b, vis[mask]] = True
    ref = masked_reference_logits(adapter, prepared, P, dropped, steps=8)
    assert (out.logits - ref).abs().max() < 1e-5


@pytest.mark.parametrize("P", [0, 2])
def test_store_source_reviving_every_token_equals_unpruned(family, P):
    """Revived tokens (DSTP `store`, every dropped token, for the whole run) are read at sliding layers only inside
    the window of their original index: the run equals the unpruned one."""
    model, adapter, batch = family
    engine = Engine(adapter)
    prepared = adapter.prepare(batch)
    full = engine.generate(prepared, GenerationConfig(max_new_tokens=12), return_logits=True)
    cfg = DSTPConfig(variant="all_tokens", source="store", window=12, force_every=100)
    out = run(engine, prepared, P, kept_sets(prepared), cfg)
    assert bool(out.trace.steps[0].shift.all())
    assert torch.equal(out.tokens, full.tokens)
    assert (out.logits - full.logits).abs().max() < 1e-5


def test_recomputed_kv_equals_prefill_that_kept_them(family):
    """DSTP `recompute`: a revived token's K/V through the sliding layers above P attend to its own window only,
    as a prefill that had kept the token computes them."""
    model, adapter, batch = family
    engine, P = Engine(adapter), 1
    prepared = adapter.prepare(batch)
    kept = kept_sets(prepared, drop=6)
    policy = ShiftPolicy(DSTPConfig(force_every=1, window=5, variant="random"), P)
    state, pstate, logits, _ = engine.start(prepared, 8, pruner=FixedPruner(P, kept), shift=policy)
    for _ in range(3):
        logits, _, _ = engine.decode_step(state, logits.argmax(-1), policy, pstate, policy.noise(pstate))
    revived, s, checked = pstate.revived, state.pruned, 0
    for b in range(len(kept)):
        for rank in torch.nonzero(revived[b]).flatten().tolist():
            with_it = [sorted(set(kept[b]) | {rank})] * len(kept)
            r = engine.prefill(prepared, 4, pruner=FixedPruner(P, with_it))[0].pruned
            pos = int(state.visual_pos[b, rank])
            slot = int(torch.nonzero((s.order[b] == pos) & s.valid[b])[0])
            ref_slot = int(torch.nonzero((r.order[b] == pos) & r.valid[b])[0])
            for li in range(len(s.layers)):
                assert (s.k[li][b, :, slot] - r.k[li][b, :, ref_slot]).abs().max() < 1e-5
                assert (s.v[li][b, :, slot] - r.v[li][b, :, ref_slot]).abs().max() < 1e-5
            checked += 1
    assert checked > 0


def test_a_sliding_layer_refuses_an_attention_built_without_its_window():
    """Never a silent full-attention run: the layer loop asks each attention for its sliding variant."""
    assert CAUSAL.at_layer(False) is CAUSAL
    with pytest.raises(RuntimeError, match="sliding-window layer"):
        CAUSAL.at_layer(True)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool).tril()
    windowed = CAUSAL.with_sliding(Attention(mask=mask))
    assert windowed.at_layer(True).mask is mask and windowed.at_layer(False).causal
