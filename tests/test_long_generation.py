"""Long generations: the KV stores grow in chunks (same tokens as a store allocated at once), and a
max_new_tokens beyond the model's context is refused before anything is allocated."""
import pytest
import torch

from dstp import ConfigError, DSTPConfig, PruneConfig
from dstp.config import GenerationConfig
from dstp.engine import engine as engine_module
from dstp.engine import kv_store
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.shift import ShiftPolicy
from dstp.lab.bench import tiny_models as tm


def run(adapter, prepared, pruner=None, shift=None, n=40):
    return Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=n), pruner=pruner, shift=shift, return_logits=True)


@pytest.mark.parametrize("source", [None, "recompute", "store"])
def test_growing_stores_give_the_same_generation(monkeypatch, source):
    model = tm.tiny_llava()
    adapter = adapter_for_model(model)
    prepared = adapter.prepare(tm.llava_batch([3, 7, 1]))
    pruner = get_pruner(PruneConfig("fastv", 0.333, layer=2), adapter.n_layers)
    shift = ShiftPolicy(DSTPConfig(source=source, force_every=5), 2) if source else None
    whole = run(adapter, prepared, pruner, shift)
    monkeypatch.setattr(kv_store, "GROW_CHUNK", 3)
    monkeypatch.setattr(engine_module, "GROW_CHUNK", 3)
    grown = run(adapter, prepared, pruner, shift)
    assert torch.equal(whole.tokens, grown.tokens)
    assert torch.allclose(whole.logits, grown.logits, atol=1e-6)


def test_store_allocates_only_a_first_chunk(monkeypatch):
    model = tm.tiny_llava()
    adapter = adapter_for_model(model)
    engine = Engine(adapter)
    store = engine.new_store(range(0, 2), 2, prompt_slots=30, max_new_tokens=10_000, reserve=5)
    assert store.capacity == 5 + 30 + kv_store.GROW_CHUNK and store.limit == 30 + 10_000
    order = torch.arange(30 + kv_store.GROW_CHUNK + 1).expand(2, -1)
    store.claim(5, order, torch.ones_like(order, dtype=torch.bool))  # one past the first chunk
    assert store.capacity == 5 + 30 + 2 * kv_store.GROW_CHUNK and store.reserve == 5
    assert not store.ensure(store.capacity) and store.ensure(store.capacity + 1)  # whole chunks, when needed
    assert store.capacity == 5 + 30 + 3 * kv_store.GROW_CHUNK
    store.k[0][:, :, 5:8] = 1.0
    store.grow_reserve(3)  # reserve slots come first: the rest moves up, contents and tags kept
    assert store.reserve == 8 and store.filled == 8 + 30 + kv_store.GROW_CHUNK + 1
    assert (store.k[0][:, :, 8:11] == 1.0).all() and (store.k[0][:, :, :8] == 0).all()
    assert torch.equal(store.order[:, 8:store.filled], order)
    with pytest.raises(RuntimeError, match="KV store overflow"):
        store.ensure(8 + 30 + 10_001)


def test_max_new_tokens_beyond_the_context_is_refused():
    model = tm.tiny_llava()  # 512 positions
    adapter = adapter_for_model(model)
    prepared = adapter.prepare(tm.llava_batch([3]))
    with pytest.raises(ConfigError, match="max_new_tokens=1000000000 does not fit.*512 positions"):
        Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=1_000_000_000))
