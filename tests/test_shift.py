"""DSTP against its contracts (DESIGN §5): no-trigger identity, exact revived K/V, windows, row independence."""
import pytest
import torch

from dstp.config import DSTPConfig, GenerationConfig
from dstp.engine.engine import Engine
from dstp.errors import ConfigError
from dstp.models.registry import adapter_for_model
from dstp.shift import ShiftPolicy
from test_engine import FixedPruner
from dstp.lab.bench import tiny_models as tm


@pytest.fixture(scope="module")
def llava():
    model = tm.tiny_llava(layers=4)
    adapter = adapter_for_model(model)
    return adapter, Engine(adapter)


def kept_sets(prepared, frac=3, seed=0, drop=None):
    """Random kept sets: a third of the tokens, or all but `drop` of them. (CPTS compares S0 attention, a softmax
    over k keys, with reserve attention, a softmax over N - k keys; on a near-uniform random model only a small
    reserve out-scores S0, so tests that need revivals keep most tokens.)"""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(n) - drop if drop else max(1, int(n) // frac) for n in prepared.n_visual]
    return [sorted(torch.randperm(int(n), generator=g)[:k].tolist()) for n, k in zip(prepared.n_visual, sizes)]


def run(engine, prepared, P, kept, shift=None, n=12):
    policy = ShiftPolicy(shift, P) if shift is not None else None
    return engine.generate(prepared, GenerationConfig(max_new_tokens=n), pruner=FixedPruner(P, kept), shift=policy,
                           return_logits=True)


@pytest.mark.parametrize("P", [0, 2])
def test_never_triggered_equals_vanilla(llava, P):
    """Same tokens; logits to float rounding only: the step reads DSTP's reserve slots too, masked (its shapes must
    not depend on what is revived), and SDPA's reductions over a longer key row round differently."""
    adapter, engine = llava
    prepared = adapter.prepare(tm.llava_batch([3, 7, 1]))
    kept = kept_sets(prepared)
    vanilla = run(engine, prepared, P, kept)
    dstp = run(engine, prepared, P, kept, DSTPConfig(tau=-1.0))
    assert torch.equal(vanilla.tokens, dstp.tokens)
    assert (vanilla.logits - dstp.logits).abs().max() < 1e-5
    assert not any(bool(s.shift.any()) for s in dstp.trace.steps)


@pytest.mark.parametrize("P", [0, 2])
def test_all_tokens_store_window_equals_unpruned(llava, P):
    adapter, engine = llava
    prepared = adapter.prepare(tm.llava_batch([3, 7, 1]))
    kept = kept_sets(prepared)
    full = engine.generate(prepared, GenerationConfig(max_new_tokens=12), return_logits=True)
    cfg = DSTPConfig(variant="all_tokens", source="store", window=12, force_every=100)
    out = run(engine, prepared, P, kept, cfg)
    assert bool(out.trace.steps[0].shift.all())
    assert torch.equal(out.tokens, full.tokens)
    assert (out.logits - full.logits).abs().max() < 1e-5
    assert [int(x) for x in out.trace.steps[0].visual_attended] == [int(n) for n in prepared.n_visual]


@pytest.mark.parametrize("P,steps", [(0, 1), (2, 1), (2, 4)])
def test_recomputed_kv_equals_prefill_that_kept_them(llava, P, steps):
    """After `steps` forced shifts (later ones reuse the per-sequence cache of computed tokens)."""
    adapter, engine = llava
    prepared = adapter.prepare(tm.llava_batch([3, 7, 1]))
    kept = kept_sets(prepared, drop=6)
    policy = ShiftPolicy(DSTPConfig(force_every=1, window=5, variant="random" if steps > 1 else "dstp"), P)
    state, pstate, logits, _ = engine.start(prepared, 8, pruner=FixedPruner(P, kept), shift=policy)
    for _ in range(steps):
        logits, _, _ = engine.decode_step(state, logits.argmax(-1), policy, pstate,
                                          policy.noise(pstate) if policy else None)
    revived = pstate.revived
    assert revived.any()
    s = state.pruned
    for b in range(len(kept)):
        for rank in torch.nonzero(revived[b]).flatten().tolist():
            with_it = [sorted(set(kept[b]) | {rank})] * len(kept)
            r = engine.prefill(prepared, 4, pruner=FixedPruner(P, with_it))[0].pruned
            pos = int(state.visual_pos[b, rank])
            slot = int(torch.nonzero((s.order[b] == pos) & s.valid[b])[0])
            ref_slot = int(torch.nonzero((r.order[b] == pos) & r.valid[b])[0])
            assert slot < s.reserve  # it lives in the reserve
            for li in range(len(s.layers)):
                assert (s.k[li][b, :, slot] - r.k[li][b, :, ref_slot]).abs().max() < 1e-5
                assert (s.v[li][b, :, slot] - r.v[li][b, :, ref_slot]).abs().max() < 1e-5


@pytest.mark.parametrize("source", ["recompute", "store"])
def test_window_expires_after_exactly_window_steps(llava, source):
    adapter, engine = llava
    prepared = adapter.prepare(tm.llava_batch([3]))
    kept = kept_sets(prepared, drop=6)
    W = 4
    out = run(engine, prepared, 2, kept, DSTPConfig(tau=-1.0, window=W, force_every=100, source=source), n=10)
    active = [int(s.active[0]) for s in out.trace.steps]
    k = len(kept[0])
    assert all(a > k for a in active[:W]), active
    assert all(a == k for a in active[W:]), active
    assert out.trace.steps[0].revived[0] and not out.trace.steps[1].revived[0]


def test_rows_shift_independently(llava):
    adapter, engine = llava
    batch = tm.llava_batch([4, 4, 4], seed=3)  # equal lengths: no padding differences between runs
    prepared = adapter.prepare(batch)
    kept = kept_sets(prepared)
    probe = run(engine, prepared, 2, kept, DSTPConfig(tau=-1.0))
    sims = torch.stack([s.similarity for s in probe.trace.steps], 1)  # [B, steps]
    lo = sims.min(1).values
    shifter = int(lo.argmin())
    others = [b for b in range(3) if b != shifter]
    tau = float(min(lo[b] for b in others)) - 1e-4
    assert float(lo[shifter]) < tau, "test needs one row whose similarity dips below the others'"
    out = run(engine, prepared, 2, kept, DSTPConfig(tau=tau, window=3))
    shifts = torch.stack([s.shift for s in out.trace.steps], 1)
    assert shifts[shifter].any() and not shifts[others].any()
    # Rows that do not shift decode exactly as they would alone. Logits agree to float rounding, not to the bit:
    # CPU BLAS rounds a batch of 3 differently from a batch of 1 even without pruning (about 1e-6 here).
    for b in others:
        alone = {k: v[b:b + 1] for k, v in batch.items()}
        single = run(engine, adapter.prepare(alone), 2, [kept[b]], DSTPConfig(tau=tau, window=3))
        assert torch.equal(single.tokens[0], out.tokens[b])
        assert (single.logits[0] - out.logits[b]).abs().max() < 1e-5
        assert [bool(s.shift[0]) for s in single.trace.steps] == [False] * len(single.trace.steps)
    # the shifting row changed only itself: same batch, no DSTP at all, other rows equal to float rounding
    vanilla = run(engine, prepared, 2, kept)
    assert (vanilla.logits[others] - out.logits[others]).abs().max() < 1e-5


def test_bad_dstp_config_is_rejected():
    with pytest.raises(ConfigError, match="tau"):
        DSTPConfig(tau=1.5)
    with pytest.raises(ConfigError, match="window"):
        DSTPConfig(window=0)
    with pytest.raises(ConfigError, match="source"):
        DSTPConfig(source="disk")
    with pytest.raises(ConfigError, match="variant"):
        DSTPConfig(variant="sometimes")
