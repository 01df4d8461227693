"""Memory: the allocation tracker counts what was allocated; the engine's reported figure is every buffer its state
holds, equal to the tracker's count; the recompute cache holds only computed tokens, grows in chunks and keeps its
bound without changing the tokens."""
import pytest
import torch

from dstp.lab.bench.speed.memory import LiveTensorBytes, PeakMemory, storage_bytes
from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.errors import ConfigError
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.shift import ShiftPolicy
from dstp.lab.bench import tiny_models as tm


@pytest.fixture(scope="module")
def llava():
    model = tm.tiny_llava(layers=4)
    adapter = adapter_for_model(model)
    return adapter, Engine(adapter)


def test_tracker_counts_known_allocations():
    weights = torch.randn(100, 100)
    with LiveTensorBytes() as m:
        a = torch.zeros(1000)  # 4,000 bytes
        views = [a[10:], a.view(10, 100), a.t() if a.dim() == 2 else a.unsqueeze(0), a.detach()]
        a.add_(1)  # in place: nothing new
        torch.mul(a, 2, out=a)
        w_view = weights[:10]  # a view of a buffer made before tracking: not counted
        assert m.live_bytes == 4_000
        c = weights @ weights  # 40,000
        assert (m.live_bytes, m.peak_bytes) == (44_000, 44_000)
        del c
        assert (m.live_bytes, m.peak_bytes) == (4_000, 44_000)
        t = torch.tensor([1.0, 2.0])  # made outside the dispatcher, lifted: 8
        d = torch.empty(0)
        d.resize_(50)  # grown in place: 200
        assert m.live_bytes == 4_208
        del a
        assert m.live_bytes == 4_208  # its views keep the storage alive
        del views
        assert m.live_bytes == 208
        m.reset_peak()
        assert m.peak_bytes == 208
    del t, d, w_view


def test_peak_memory_on_cpu():
    with PeakMemory("cpu") as m:
        x = torch.ones(256, 256)  # 262,144 bytes
        y = x * 2
        del x, y
    assert m.peak_bytes == 2 * 256 * 256 * 4
    assert storage_bytes([torch.zeros(10), *[torch.zeros(10)[2:]] * 2]) == 80


def run_tracked(adapter, engine, batch, shift=None, steps=10, retention=0.333, cache_tokens=None):
    """Prepare, prefill and decode inside the tracker; returns (state, live bytes with only the state and the
    last logits alive, bytes of the tensors the state holds that were made before tracking, logits bytes)."""
    pruner = get_pruner(PruneConfig("fastv", retention, layer=2), adapter.n_layers)
    policy = ShiftPolicy(shift, 2) if shift is not None else None
    with torch.no_grad(), PeakMemory("cpu") as m:
        prepared = adapter.prepare(batch)
        state, pstate, logits, _ = engine.start(prepared, steps + 1, pruner=pruner, shift=policy)
        for _ in range(steps):
            logits, _, _ = engine.decode_step(state, logits.argmax(-1), policy, pstate,
                                          policy.noise(pstate) if policy else None)
        del _
        live = m.live_bytes
        made_before = storage_bytes([t for t in batch.values() if any(
            t.untyped_storage()._cdata == u.untyped_storage()._cdata for u in vars(prepared).values()
            if isinstance(u, torch.Tensor))])
    return state, pstate, live, made_before, logits.untyped_storage().nbytes()


@pytest.mark.parametrize("source", [None, "recompute", "store"])
def test_reported_memory_is_every_buffer_the_state_holds(llava, source):
    """Nothing is missed and nothing counted twice: with only the generation state (and the last logits) alive, the
    tracker's live bytes equal Engine.held_bytes exactly (less the input ids, made before tracking began)."""
    adapter, engine = llava
    shift = DSTPConfig(source=source, force_every=3, variant="random") if source else None
    state, pstate, live, made_before, logits_bytes = run_tracked(adapter, engine, tm.llava_batch([3, 7, 1]), shift)
    held = engine.held_bytes(state, pstate)
    assert live == sum(held.values()) - made_before + logits_bytes
    expected = {"inputs", "kv", "other"} | ({"dstp"} if source else set()) \
        | {"recompute": {"dstp_cache", "hidden_at_P"}, "store": {"reserve"}, None: set()}[source]
    assert set(held) == expected  # no probe keys: a pruner inside the LLM probes the store of layers < P
    if source is not None:  # the pruned store's head: the reserve's K/V, or the revived tokens computed so far
        s = state.pruned
        head = sum(t.untyped_storage().nbytes() for t in (*s.k, *s.v, s.order, s.valid)) // s.capacity * s.reserve
        assert s.reserve > 0 and held["reserve" if source == "store" else "dstp_cache"] == head


def test_kv_figure_is_allocated_capacity_not_used_slots(llava):
    """Unpruned, 4 new tokens: the store has room for the prompt + 4 (the first chunk), of which 3 are written."""
    adapter, engine = llava
    batch = tm.llava_batch([3])
    out = engine.generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=4))
    a, T = adapter, batch["input_ids"].shape[1]
    capacity = T + 4
    kv = 2 * a.n_layers * a.n_kv_heads * capacity * a.head_dim * 4 + capacity * (8 + 1)  # K, V; order, valid
    assert out.trace.memory_bytes["kv"] == kv
    assert out.trace.kv_bytes_peak == sum(v for k, v in out.trace.memory_bytes.items() if k != "inputs")


def generate(adapter, engine, shift, n=30, batch=None):
    pruner = get_pruner(PruneConfig("fastv", 0.333, layer=2), adapter.n_layers)
    prepared = adapter.prepare(batch or tm.llava_batch([3, 7, 1]))
    policy = ShiftPolicy(shift, 2)
    state_seen = []
    step = policy.step

    def watched(st, state, q, noise):  # the cache's size after every decoding step
        out = step(st, state, q, noise)
        state_seen.append((state.pruned.reserve, int(st.cached.sum(-1).max()),
                           [sorted(torch.nonzero(st.cached[b]).flatten().tolist()) for b in range(st.cached.shape[0])]))
        return out

    policy.step = watched
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=n), pruner=pruner,
                          shift=policy, return_logits=True)
    return out, state_seen


def test_recompute_cache_holds_only_computed_tokens(llava):
    """The reserve's slots are allocated at prefill (the decoding step's shapes never change), sized to the bound
    (here the whole reserve, 16); the tokens with K/V in it are exactly those revived so far."""
    adapter, engine = llava
    out, seen = generate(adapter, engine, DSTPConfig(force_every=6, window=3, variant="random"))
    revived_ever = [set() for _ in range(3)]
    for step, (capacity, most, cached) in zip(out.trace.steps, seen):
        for b in range(3):
            revived_ever[b] |= set(step.revived[b])
            assert set(cached[b]) == revived_ever[b]  # exactly the tokens computed so far
        assert most <= capacity == 16
    assert any(revived_ever) and max(len(r) for r in revived_ever) < 16


def test_recompute_cache_bound_is_kept_and_tokens_do_not_change(llava):
    """cache_tokens = the tokens one shift may revive (9 of a reserve of 16): the least recently revived tokens are evicted and
    recomputed when revived again; tokens equal the unbounded cache's, logits to float rounding."""
    adapter, engine = llava
    cfg = dict(force_every=2, window=2, variant="random")
    free, free_seen = generate(adapter, engine, DSTPConfig(**cfg))
    bound, bound_seen = generate(adapter, engine, DSTPConfig(**cfg, cache_tokens=9))
    assert max(c for c, _, _ in free_seen) == 16
    assert max(c for c, _, _ in bound_seen) == 9 and max(m for _, m, _ in bound_seen) == 9
    assert bound.trace.decode_flops > free.trace.decode_flops  # evicted tokens were computed again
    assert torch.equal(free.tokens, bound.tokens)
    assert (free.logits - bound.logits).abs().max() < 1e-5


def test_cache_bound_below_the_revival_slots_is_refused(llava):
    adapter, engine = llava
    with pytest.raises(ConfigError, match="cache_tokens=4 is below the 9 tokens one shift may revive"):
        generate(adapter, engine, DSTPConfig(force_every=2, cache_tokens=4), n=3)
    with pytest.raises(ConfigError, match="cache_tokens must be an integer >= 1"):
        DSTPConfig(cache_tokens=0)
    with pytest.raises(ConfigError, match="must be >= max_revived"):
        DSTPConfig(cache_tokens=3, max_revived=5)


def test_measured_peak_recompute_below_store(llava):
    """On the same inputs, the recompute source needs less memory than the store source, measured."""
    adapter, engine = llava
    pruner = get_pruner(PruneConfig("fastv", 0.333, layer=2), adapter.n_layers)
    batch = tm.llava_batch([3, 7, 1])
    peaks = {}
    for source in ("recompute", "store"):
        policy = ShiftPolicy(DSTPConfig(source=source, force_every=4, variant="random", cache_tokens=9), 2)
        with PeakMemory("cpu") as m:
            engine.generate(adapter.prepare(batch), GenerationConfig(max_new_tokens=20), pruner=pruner, shift=policy)
        peaks[source] = m.peak_bytes
    assert peaks["recompute"] < peaks["store"]
