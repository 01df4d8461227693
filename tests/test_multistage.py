"""Multi-stage pruning in the engine (DESIGN §4): one compacted store per stage, exact against a masked reference
that keeps the same tokens per stage; DSTP on top (S0 = the final stage's set, revived tokens get K/V and slots
in every stage from the first that dropped them)."""
import pytest
import torch

from dstp.config import DSTPConfig, GenerationConfig
from dstp.engine.engine import Engine
from dstp.engine.prune_context import PruneResult
from dstp.errors import ConfigError
from reference import hf_layer
from dstp.models.registry import adapter_for_model
from dstp.shift import ShiftPolicy
from test_engine import FAMILIES
from dstp.lab.bench import tiny_models as tm


class FixedStages:
    """Keeps given visual tokens per stage (rank among the row's visual tokens); `merged[s]` [B, Nmax, D]
    replaces the hidden states of stage s's kept tokens (token merging), or None."""

    def __init__(self, layers, kept, merged=None):
        self.stage_layers, self.layer = tuple(layers), layers[0]
        self.kept_lists, self.merged = kept, merged or [None] * len(layers)

    def select(self, ctx):
        kept = torch.zeros(ctx.batch, ctx.nmax, dtype=torch.bool)
        for b, idx in enumerate(self.kept_lists[ctx.stage]):
            kept[b, idx] = True
        return PruneResult(kept=kept, hidden=self.merged[ctx.stage])


def shrinking_sets(prepared, n_stages, seed=0, drop=None):
    """Per stage, per row: a random subset of the stage before (about 2/3 of it, or all but `drop` more)."""
    g = torch.Generator().manual_seed(seed)
    stages = []
    for b, n in enumerate(prepared.n_visual.tolist()):
        cur = sorted(torch.randperm(n, generator=g).tolist())
        for s in range(n_stages):
            k = len(cur) - drop if drop else max(1, (2 * len(cur)) // 3)
            cur = sorted(torch.tensor(cur)[torch.randperm(len(cur), generator=g)[:k]].tolist())
            if b == 0:
                stages.append([])
            stages[s].append(cur)
    return stages


@torch.no_grad()
def staged_reference_logits(adapter, prepared, points, kept, merged, steps):
    """Greedy logits [B, steps, V] of the whole sequence, no KV cache: layer i of stage s (points[s] <= i) may not
    attend to the visual tokens stage s dropped, and stage s's merged hidden states replace the kept tokens'
    at the input of layer points[s]. Shares nothing with the engine but the adapter's prepare/rotary/layers."""
    h0 = prepared.inputs_embeds
    B, T, D = h0.shape
    vis = [torch.nonzero(prepared.visual_mask[b]).flatten() for b in range(B)]
    dropped, replace = [], []
    for s in range(len(points)):
        d = prepared.visual_mask.clone()
        rep = torch.zeros(B, T, dtype=torch.bool)
        vals = torch.zeros(B, T, D)
        for b in range(B):
            d[b, vis[b][kept[s][b]]] = False
            if merged[s] is not None:
                rep[b, vis[b][kept[s][b]]] = True
                vals[b, vis[b][kept[s][b]]] = merged[s][b, kept[s][b]]
        dropped.append(d)
        replace.append((rep, vals) if merged[s] is not None else None)
    out, tokens = [], []
    for t in range(steps):
        new = torch.stack(tokens, 1) if tokens else torch.zeros(B, 0, dtype=torch.long)
        h = torch.cat([h0, adapter.embed_tokens(new)], 1)
        extra = prepared.next_position[:, None] + torch.arange(len(tokens))
        pos = prepared.position_ids
        p = torch.cat([pos, extra[None].expand(3, -1, -1) if pos.dim() == 3 else extra], -1)
        n = h.shape[1]
        v = torch.cat([prepared.attention_mask, torch.ones(B, n - T, dtype=torch.bool)], 1)
        base = torch.ones(n, n, dtype=torch.bool).tril()[None] & v[:, None, :] | torch.eye(n, dtype=torch.bool)[None]
        cos, sin = adapter.rotary(h, p)
        index = torch.where(torch.arange(n) < T, torch.arange(n), -1).expand(B, n)
        for i, layer in enumerate(adapter.layers):
            stage = max([s for s, q in enumerate(points) if q <= i], default=None)
            if i in points and replace[points.index(i)] is not None:
                rep, vals = replace[points.index(i)]
                h = torch.cat([torch.where(rep[..., None], vals, h[:, :T]), h[:, T:]], 1)
            m = base if stage is None else base & ~torch.cat([dropped[stage], torch.zeros(B, n - T, dtype=torch.bool)],
                                                             1)[:, None, :]
            h = hf_layer(layer, h, m[:, None], cos, sin)
            h = adapter.after_layer(i, h, index, prepared.extras)
        if points[-1] == len(adapter.layers) and replace[-1] is not None:  # a last stage after every layer
            rep, vals = replace[-1]
            h = torch.cat([torch.where(rep[..., None], vals, h[:, :T]), h[:, T:]], 1)
        lg = adapter.lm_head(adapter.final_norm(h[:, -1:]))[:, -1].float()
        out.append(lg)
        tokens.append(lg.argmax(-1))
    return torch.stack(out, 1)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    make, one, three = FAMILIES[request.param]
    model = make()
    adapter = adapter_for_model(model)
    return request.param, adapter, adapter.prepare(three())


def random_merge(prepared, kept, seed):
    """Replacement hidden states for the kept tokens of one stage (what a merging pruner hands back)."""
    g = torch.Generator().manual_seed(seed)
    B, D = prepared.inputs_embeds.shape[0], prepared.inputs_embeds.shape[-1]
    return torch.randn(B, int(prepared.n_visual.max()), D, generator=g) * 0.5


@pytest.mark.parametrize("points,merge", [((1, 2, 3), False), ((0, 2, 3), False), ((1, 3), True)])
def test_stages_equal_masked_reference(family, points, merge):
    name, adapter, prepared = family
    kept = shrinking_sets(prepared, len(points), seed=sum(points))
    merged = [random_merge(prepared, kept[s], s) if merge and s == 1 else None for s in range(len(points))]
    engine = Engine(adapter)
    pruner = FixedStages(points, kept, merged)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=8), pruner=pruner, return_logits=True)
    ref = staged_reference_logits(adapter, prepared, points, kept, merged, steps=8)
    assert (out.logits - ref).abs().max() < 1e-5
    assert out.trace.kept == kept[-1]
    assert out.trace.stages == [(p, k) for p, k in zip(points, kept)]
    assert out.trace.steps[0].visual_attended.tolist() == [len(k) for k in kept[-1]]


def test_each_stage_runs_on_its_own_shorter_sequence(family):
    name, adapter, prepared = family
    points = (1, 2, 3)
    kept = shrinking_sets(prepared, 3)
    state, _, _, _ = Engine(adapter).prefill(prepared, 4, pruner=FixedStages(points, kept))
    text = prepared.attention_mask & ~prepared.visual_mask
    sizes = []
    for s, stage in enumerate(state.stages):
        assert stage.layers == range(points[s], points[s + 1] if s + 1 < 3 else adapter.n_layers)
        assert len(stage.store.k) == len(stage.layers)
        for b in range(prepared.inputs_embeds.shape[0]):
            H = stage.store.reserve
            held = stage.store.order[b, H:H + stage.Tk][stage.store.valid[b, H:H + stage.Tk]].tolist()
            vis = torch.nonzero(prepared.visual_mask[b]).flatten()
            assert held == sorted(torch.nonzero(text[b]).flatten().tolist() + vis[kept[s][b]].tolist())
        sizes.append(stage.Tk)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_bad_schedules_are_config_errors():
    adapter = adapter_for_model(tm.tiny_llava())
    prepared = adapter.prepare(tm.llava_batch([3, 7]))
    engine = Engine(adapter)
    grows = [[[0, 1, 2]] * 2, [[0, 1, 2, 3]] * 2]
    with pytest.raises(ConfigError, match="keeps visual tokens an earlier stage dropped"):
        engine.prefill(prepared, 2, pruner=FixedStages((1, 2), grows))
    with pytest.raises(ConfigError, match="increasing layers"):
        engine.prefill(prepared, 2, pruner=FixedStages((2, 2), [[[0, 1]] * 2] * 2))


# -- DSTP on a multi-stage pruner ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    adapter = adapter_for_model(tm.tiny_llava(layers=4))
    return adapter, Engine(adapter), adapter.prepare(tm.llava_batch([3, 7, 1]))


def run(engine, prepared, pruner, shift=None, n=10):
    policy = ShiftPolicy(shift, pruner.layer) if shift is not None else None
    return engine.generate(prepared, GenerationConfig(max_new_tokens=n), pruner=pruner, shift=policy, return_logits=True)


@pytest.mark.parametrize("points", [(1, 2, 3), (0, 2, 3)])
def test_never_triggered_dstp_equals_vanilla(llava, points):
    """Same tokens, logits to float rounding (the step reads the reserve too, masked: test_shift.py)."""
    adapter, engine, prepared = llava
    pruner = FixedStages(points, shrinking_sets(prepared, 3))
    vanilla = run(engine, prepared, pruner)
    dstp = run(engine, prepared, pruner, DSTPConfig(tau=-1.0))
    assert torch.equal(vanilla.tokens, dstp.tokens) and (vanilla.logits - dstp.logits).abs().max() < 1e-5


@pytest.mark.parametrize("points", [(1, 2, 3), (0, 2, 3)])
def test_all_tokens_store_window_equals_unpruned(llava, points):
    adapter, engine, prepared = llava
    full = engine.generate(prepared, GenerationConfig(max_new_tokens=10), return_logits=True)
    out = run(engine, prepared, FixedStages(points, shrinking_sets(prepared, 3)),
              DSTPConfig(variant="all_tokens", source="store", window=10, force_every=100))
    assert torch.equal(out.tokens, full.tokens)
    assert (out.logits - full.logits).abs().max() < 1e-5
    assert out.trace.steps[0].visual_attended.tolist() == prepared.n_visual.tolist()


@pytest.mark.parametrize("name,source", [("llava", "recompute"), ("qwen3_vl", "recompute"), ("llava", "store")])
def test_revived_tokens_get_kv_and_slots_from_the_stage_that_dropped_them(name, source):
    """Recompute: a revived token's K/V in every stage from the first that dropped it equal a prefill whose
    stages had also kept it (Qwen3-VL: DeepStack reaches it). Store: they are the unpruned prefill's. Stages
    that still hold it give it no slot."""
    make, _, three = FAMILIES[name]
    adapter = adapter_for_model(make())
    engine, prepared = Engine(adapter), adapter.prepare(three())
    points = (1, 2, 3)
    kept = shrinking_sets(prepared, 3, drop=2)  # 6 reserve tokens, two dropped at each stage
    policy = ShiftPolicy(DSTPConfig(force_every=1, window=5, variant="random", source=source), 1)
    state, pstate, logits, _ = engine.start(prepared, 8, pruner=FixedStages(points, kept), shift=policy)
    for _ in range(3):
        logits, _, _ = engine.decode_step(state, logits.argmax(-1), policy, pstate,
                                          policy.noise(pstate) if policy else None)
    revived = pstate.revived
    assert revived.any()
    unpruned = engine.prefill(prepared, 4)[0].full  # every layer, slot = original index
    first_stages = set()
    for b in range(len(kept[0])):
        for rank in torch.nonzero(revived[b]).flatten().tolist():
            d = int(state.dropped_at[b, rank])
            first_stages.add(d)
            pos = int(state.visual_pos[b, rank])
            if source == "recompute":
                with_it = [[sorted(set(k[r]) | ({rank} if r == b else set())) for r in range(len(k))] for k in kept]
                ref = engine.prefill(prepared, 4, pruner=FixedStages(points, with_it))[0]
            for s, stage in enumerate(state.stages):
                st = stage.store
                where = torch.nonzero((st.order[b] == pos) & st.valid[b]).flatten().tolist()
                if s < d:  # still held in its prompt slots
                    assert len(where) == 1 and st.reserve <= where[0] < st.reserve + stage.Tk
                    continue
                assert len(where) == 1 and where[0] < st.reserve  # in the reserve
                for li, layer in enumerate(stage.layers):
                    if source == "recompute":
                        r = ref.stages[s].store
                        rs = int(torch.nonzero((r.order[b] == pos) & r.valid[b])[0])
                        want_k, want_v = r.k[li][b, :, rs], r.v[li][b, :, rs]
                    else:
                        want_k, want_v = unpruned.k[layer][b, :, pos], unpruned.v[layer][b, :, pos]
                    assert (st.k[li][b, :, where[0]] - want_k).abs().max() < 1e-5
                    assert (st.v[li][b, :, where[0]] - want_v).abs().max() < 1e-5
    assert len(first_stages) > 1  # tokens dropped at different stages were revived


def test_window_expires_in_every_stage(llava):
    adapter, engine, prepared = llava
    pruner = FixedStages((1, 2, 3), shrinking_sets(prepared, 3, drop=2))
    W = 3
    out = run(engine, prepared, pruner, DSTPConfig(tau=-1.0, window=W, force_every=100), n=8)
    k = torch.tensor([len(x) for x in pruner.kept_lists[-1]])
    active = torch.stack([s.active for s in out.trace.steps])
    assert (active[:W] >= k).all() and (active[:W] > k).any() and (active[W:] == k).all()
    assert any(out.trace.steps[0].revived) and not any(out.trace.steps[W].revived)


@pytest.mark.parametrize("method", ["sparsevlm", "pyramiddrop"])
def test_dstp_on_the_multi_stage_pruners(method):
    """Never triggered: the vanilla pruner to the bit. Forced shifts, both sources: revived tokens come from the
    reserve (every visual token not in the final set, cluster tokens' members included) and the window widens
    the final stage. all_tokens + store: unpruned decoding (pyramiddrop; sparsevlm's `store` prefill carries its
    first stage's cluster tokens, as a single-stage merging pruner's does, so it is not the unpruned model)."""
    from dstp.config import PruneConfig
    from dstp.pruners import get_pruner

    adapter = adapter_for_model(tm.tiny_llava(layers=8))
    engine, prepared = Engine(adapter), adapter.prepare(tm.llava_batch([3, 7, 1]))
    pruner = get_pruner(PruneConfig(method, 0.333), adapter.n_layers)
    vanilla = run(engine, prepared, pruner)
    quiet = run(engine, prepared, pruner, DSTPConfig(tau=-1.0))
    assert torch.equal(vanilla.tokens, quiet.tokens) and (vanilla.logits - quiet.logits).abs().max() < 1e-5
    assert quiet.trace.stages == vanilla.trace.stages and len(vanilla.trace.stages) == 3
    assert sum(map(len, vanilla.trace.kept)) < sum(map(len, vanilla.trace.stages[0][1]))
    for source in ("recompute", "store"):
        out = run(engine, prepared, pruner, DSTPConfig(force_every=3, window=2, variant="random", source=source))
        revived = [r for s in out.trace.steps for row in s.revived for r in row]
        assert revived and all(r not in out.trace.kept[b] for s in out.trace.steps for b, row in enumerate(s.revived)
                               for r in row)
        assert (out.trace.steps[0].active > vanilla.trace.steps[0].visual_attended).any()
    if method == "pyramiddrop":
        full = engine.generate(prepared, GenerationConfig(max_new_tokens=10), return_logits=True)
        out = run(engine, prepared, pruner, DSTPConfig(variant="all_tokens", source="store", window=10,
                                                       force_every=100))
        assert torch.equal(out.tokens, full.tokens) and (out.logits - full.logits).abs().max() < 1e-5
