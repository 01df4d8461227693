"""LLaVA-OneVision and Qwen3-VL-MoE beyond the shared parametrised tests (test_engine, test_pruners, test_chat_hub,
test_hub_fixtures): every pruner with DSTP from both sources, DSTP's exactness contracts, the OneVision encoder
scores against SigLIP's own eager attention, the one-line refusal of VisionZip on a downsampled image, and the
MoE FLOP count. Tiny random models (src/dstp/lab/bench/tiny_models.py)."""
import copy

import pytest
import torch

from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.errors import InputError
from dstp.lab.bench import tiny_models as tm
from dstp.models.registry import adapter_for_model
from dstp.pruners import PRUNERS, get_pruner
from dstp.pruners.base import budget
from dstp.shift import ShiftPolicy
from test_engine import FixedPruner

BATCHES = {  # a row with crops, a row with two images (a view each), a text-only row / Qwen grids of three sizes
    "llava_onevision": (tm.tiny_llava_onevision,
                        lambda: tm.llava_onevision_batch([[(30, 55)], [(40, 40), (20, 20)], []], [3, 7, 4])),
    "qwen3_vl_moe": (tm.tiny_qwen3_vl_moe, lambda: tm.qwen3_vl_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
}


@pytest.fixture(scope="module", params=sorted(BATCHES))
def family(request):
    make, batch = BATCHES[request.param]
    adapter = adapter_for_model(make())
    return request.param, adapter, Engine(adapter), adapter.prepare(batch())


def relevant(prepared):
    return torch.rand(prepared.inputs_embeds.shape[0], int(prepared.n_visual.max()),
                      generator=torch.Generator().manual_seed(0)) < 0.25


@pytest.mark.parametrize("source", ["recompute", "store"])
def test_every_pruner_with_dstp_runs(family, source):
    """Each pruner keeps its budget on every row (none on the text-only row); DSTP, forced every other step,
    revives nothing on the text-only row and some tokens elsewhere (whether a forced shift revives a token
    depends on its scores, which are near-uniform on a random model)."""
    name, adapter, engine, prepared = family
    n, revived = prepared.n_visual, 0
    for method in sorted(m for m in PRUNERS if not PRUNERS[m].video_only):  # evs: tests/test_evs.py
        pruner = get_pruner(PruneConfig(method, 0.3, seed=1), adapter.n_layers)
        policy = ShiftPolicy(DSTPConfig(force_every=2, window=3, source=source), pruner.layer)
        out = engine.generate(prepared, GenerationConfig(max_new_tokens=5), pruner=pruner, shift=policy,
                              relevant=relevant(prepared))
        assert out.tokens.shape == (len(n), 5), method
        if method != "sparsevlm":  # its final set adds cluster tokens to the last stage's budget
            assert [len(k) for k in out.trace.kept] == budget(n, 0.3).tolist(), method
        assert bool(torch.stack([s.shift for s in out.trace.steps]).any(0).all()), method  # forced on every row
        assert not any(s.revived[b] for s in out.trace.steps if s.revived for b in range(len(n)) if n[b] == 0)
        revived += sum(len(row) for s in out.trace.steps if s.revived for row in s.revived)
    assert revived > 0


def test_never_triggered_dstp_equals_the_pruner_alone(family):
    """`recompute` (`store` prefills unpruned from P by design: its all-tokens window equals the unpruned model,
    below)."""
    name, adapter, engine, prepared = family
    kept = [sorted(torch.randperm(int(k), generator=torch.Generator().manual_seed(b))[: int(k) // 3].tolist())
            for b, k in enumerate(prepared.n_visual)]
    cfg = GenerationConfig(max_new_tokens=8)
    alone = engine.generate(prepared, cfg, pruner=FixedPruner(2, kept), return_logits=True)
    never = engine.generate(prepared, cfg, pruner=FixedPruner(2, kept), return_logits=True,
                            shift=ShiftPolicy(DSTPConfig(tau=-1.0), 2))
    assert torch.equal(alone.tokens, never.tokens)
    assert (alone.logits - never.logits).abs().max() < 1e-5


def test_store_window_over_all_tokens_equals_unpruned(family):
    name, adapter, engine, prepared = family
    kept = [list(range(0, int(k), 3)) for k in prepared.n_visual]
    full = engine.generate(prepared, GenerationConfig(max_new_tokens=8), return_logits=True)
    policy = ShiftPolicy(DSTPConfig(variant="all_tokens", source="store", window=8, force_every=100), 2)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=8), pruner=FixedPruner(2, kept), shift=policy,
                          return_logits=True)
    assert torch.equal(out.tokens, full.tokens)
    assert (out.logits - full.logits).abs().max() < 1e-5


def test_recomputed_kv_equals_prefill_that_kept_them(family):
    """A revived token's recomputed K/V in every layer equal those of a prefill that kept it (MoE: the router
    picks the same experts for it)."""
    name, adapter, engine, prepared = family
    P = 2
    kept = [list(range(0, max(int(k) - 6, 0))) for k in prepared.n_visual]
    policy = ShiftPolicy(DSTPConfig(force_every=1, window=5), P)
    state, pstate, logits, _ = engine.start(prepared, 8, pruner=FixedPruner(P, kept), shift=policy)
    engine.decode_step(state, logits.argmax(-1), policy, pstate, policy.noise(pstate))
    s, checked = state.pruned, 0
    for b in range(len(kept)):
        for rank in torch.nonzero(pstate.revived[b]).flatten().tolist():
            with_it = [sorted(set(kept[b]) | {rank})] * len(kept)
            r = engine.prefill(prepared, 4, pruner=FixedPruner(P, with_it))[0].pruned
            pos = int(state.visual_pos[b, rank])
            slot = int(torch.nonzero((s.order[b] == pos) & s.valid[b])[0])
            ref = int(torch.nonzero((r.order[b] == pos) & r.valid[b])[0])
            for li in range(len(s.layers)):
                assert (s.k[li][b, :, slot] - r.k[li][b, :, ref]).abs().max() < 1e-5
                assert (s.v[li][b, :, slot] - r.v[li][b, :, ref]).abs().max() < 1e-5
            checked += 1
    assert checked > 0


def test_onevision_scores_are_siglip_received_attention():
    """No CLS in SigLIP: a patch's score is the head-mean attention it receives, averaged over its view's
    queries, at the feature layer: from SigLIP's own eager attention weights."""
    make, batch = BATCHES["llava_onevision"]
    model = make()
    adapter = adapter_for_model(model)
    b = batch()
    vision = adapter.prepare(b).vision
    eager = copy.deepcopy(model)
    eager.model.vision_tower.set_attn_implementation("eager")
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    crops = image_size_to_num_patches(b["image_sizes"][0], model.config.image_grid_pinpoints, 24)  # row 0: anyres
    views = torch.cat([b["pixel_values"][0, :crops], b["pixel_values"][1:, :1].flatten(0, 1)])  # row 1: a view each
    with torch.no_grad():
        out = eager.model.vision_tower(views, output_attentions=True)
    expect = out.attentions[-1].mean(1).mean(1)  # [views, patches]
    assert torch.allclose(vision.scores, expect, atol=1e-6)


def test_downsampled_onevision_image_equals_generate_and_visionzip_refuses_it_in_one_line():
    model = tm.tiny_llava_onevision()
    adapter = adapter_for_model(model)
    big = tm.llava_onevision_batch([[(70, 70)], [(30, 55)]], [3, 5])  # 3x3 crops: 12x12 features > 4 views' worth
    prepared = adapter.prepare(big, vision_scores=False)
    assert prepared.n_visual.tolist()[0] == 16 + 8 * 9  # base view + the crops downsampled to 8x8 + 8 newlines
    hf = model.generate(**big, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=16), return_logits=True)
    assert torch.equal(out.tokens, hf.sequences[:, big["input_ids"].shape[1]:])
    assert (out.logits - torch.stack(hf.logits, 1)).abs().max() < 1e-5
    with pytest.raises(InputError) as e:
        adapter.prepare(big)  # VisionZip's inputs (encoder internals) asked for
    assert str(e.value).startswith("llava_onevision cannot give VisionZip the encoder internals of a 70x70 image")
    assert "\n" not in str(e.value)


def test_moe_flops_count_the_routed_experts_only():
    adapter = adapter_for_model(tm.tiny_qwen3_vl_moe())
    layers = adapter.layers
    dense = sum(p.numel() for n, p in layers[1].named_parameters() if p.dim() == 2)  # mlp_only_layers=[1]
    sparse = layers[0]
    experts = sum(p.numel() for p in sparse.mlp.experts.parameters())
    rest = sum(p.numel() for n, p in sparse.named_parameters() if p.dim() == 2 and ".experts." not in f".{n}")
    assert experts == 8 * 3 * 64 * 32  # gate, up, down of 8 experts
    assert adapter.linear_params_per_layer() == round((3 * (rest + experts * 2 / 8) + dense) / 4)
