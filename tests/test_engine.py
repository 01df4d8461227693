"""The engine against transformers' generate() and against an independent masked reference."""
import pytest
import torch

from dstp.config import GenerationConfig
from dstp.engine.engine import Engine
from dstp.engine.prune_context import PruneResult
from dstp.models.registry import adapter_for_model
from reference import masked_reference_logits
from dstp.lab.bench import tiny_models as tm

FAMILIES = {
    "llava": (tm.tiny_llava, lambda: tm.llava_batch([2]), lambda: tm.llava_batch([3, 7, 1])),
    "qwen2_5_vl": (tm.tiny_qwen2_5_vl, lambda: tm.qwen_batch([(8, 8)], [3]),
                   lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "qwen3_vl": (tm.tiny_qwen3_vl, lambda: tm.qwen3_vl_batch([(8, 8)], [3]),
                 lambda: tm.qwen3_vl_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
    "llava_next": (tm.tiny_llava_next, lambda: tm.llava_next_batch([(45, 45)], [2]),
                   lambda: tm.llava_next_batch([(30, 55), (60, 40), (45, 45)], [3, 7, 1])),
    "internvl": (tm.tiny_internvl, lambda: tm.internvl_batch([2], [3]),
                 lambda: tm.internvl_batch([1, 3, 2], [4, 1, 6])),
    # a row of one image (crops), one of two images (a view each); a downsampled image: test_onevision_moe.py
    "llava_onevision": (tm.tiny_llava_onevision, lambda: tm.llava_onevision_batch([[(40, 40)]], [2]),
                        lambda: tm.llava_onevision_batch([[(30, 55)], [(40, 40), (20, 20)], [(45, 45)]], [3, 7, 1])),
    "qwen3_vl_moe": (tm.tiny_qwen3_vl_moe, lambda: tm.qwen3_vl_batch([(8, 8)], [3]),
                     lambda: tm.qwen3_vl_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    make, one, three = FAMILIES[request.param]
    model = make()
    return request.param, model, adapter_for_model(model), one, three


@pytest.mark.parametrize("batch_kind", ["one", "three"])
def test_matches_transformers_generate(family, batch_kind):
    name, model, adapter, one, three = family
    batch = one() if batch_kind == "one" else three()
    hf = model.generate(**batch, max_new_tokens=32, do_sample=False, output_logits=True,
                        return_dict_in_generate=True)
    hf_tokens = hf.sequences[:, batch["input_ids"].shape[1]:]
    out = Engine(adapter).generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=32), return_logits=True)
    assert out.tokens.shape == hf_tokens.shape == (batch["input_ids"].shape[0], 32)
    assert torch.equal(out.tokens, hf_tokens)
    assert (out.logits - torch.stack(hf.logits, 1)).abs().max() < 1e-5


class FixedPruner:
    """Keeps a given set of visual tokens (rank among the row's visual tokens)."""

    def __init__(self, layer, kept):
        self.layer, self.kept_lists = layer, kept

    def select(self, ctx):
        kept = torch.zeros(ctx.batch, ctx.nmax, dtype=torch.bool)
        for b, idx in enumerate(self.kept_lists):
            kept[b, idx] = True
        return PruneResult(kept=kept)


@pytest.mark.parametrize("P", [0, 2])
def test_pruning_hook_equals_masked_reference(family, P):
    name, model, adapter, one, three = family
    prepared = adapter.prepare(three())
    B = prepared.inputs_embeds.shape[0]
    g = torch.Generator().manual_seed(P)
    kept = []
    for b in range(B):
        n = int(prepared.n_visual[b])
        kept.append(sorted(torch.randperm(n, generator=g)[: max(1, n // 3)].tolist()))
    engine = Engine(adapter)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=8), pruner=FixedPruner(P, kept),
                          return_logits=True)
    dropped = torch.zeros_like(prepared.visual_mask)
    for b in range(B):
        vis = torch.nonzero(prepared.visual_mask[b]).flatten()
        keep = torch.zeros(len(vis), dtype=torch.bool)
        keep[kept[b]] = True
        dropped[b, vis[~keep]] = True
    ref = masked_reference_logits(adapter, prepared, P, dropped, steps=8)
    assert (out.logits - ref).abs().max() < 1e-5
    # pruned tokens are really gone: layers >= P hold text + kept visual only
    assert out.trace.kept == kept
    for b in range(B):
        assert int(out.trace.steps[0].visual_attended[b]) == len(kept[b])


def test_kept_tokens_keep_original_positions(family):
    name, model, adapter, one, three = family
    prepared = adapter.prepare(three())
    engine = Engine(adapter)
    kept = [[0, 2, 5]] * prepared.inputs_embeds.shape[0]
    state, _, _, _ = engine.prefill(prepared, 4, pruner=FixedPruner(2, kept))
    s = state.pruned
    for b in range(prepared.inputs_embeds.shape[0]):
        order = s.order[b, s.reserve: s.reserve + state.Tk][s.valid[b, s.reserve: s.reserve + state.Tk]]
        expect = torch.nonzero(prepared.attention_mask[b] & ~prepared.visual_mask[b]).flatten().tolist()
        vis = torch.nonzero(prepared.visual_mask[b]).flatten()
        expect = sorted(expect + vis[[0, 2, 5]].tolist())
        assert order.tolist() == expect
        # the rotary tables used for those slots are the ones of the original positions
    assert state.Tk == int((prepared.attention_mask & ~prepared.visual_mask).sum(-1).max()) + 3


def test_sampling_is_deterministic_under_a_seed_and_stops_at_stop_tokens():
    model = tm.tiny_llava()
    adapter = adapter_for_model(model)
    engine = Engine(adapter)
    prepared = adapter.prepare(tm.llava_batch([3, 7, 1]))
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    a = engine.generate(prepared, cfg).tokens
    b = engine.generate(prepared, cfg).tokens
    c = engine.generate(prepared, GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.9,
                                                   seed=4)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a stop token ends its row: the row is padded afterwards and its length reported
    greedy = engine.generate(prepared, GenerationConfig(max_new_tokens=16)).tokens
    stop = int(greedy[1, 4])
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=16, stop_token_ids=(stop,)))
    first = int((greedy[1] == stop).nonzero()[0])
    assert out.trace.new_tokens[1] == first + 1
    assert torch.equal(out.tokens[1, : first + 1], greedy[1, : first + 1])
    assert (out.tokens[1, first + 1:] == adapter.pad_token_id).all()
