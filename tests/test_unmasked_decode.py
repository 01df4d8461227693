"""A decoding step whose store is dense (no padding, no holes; an open revival window reading only revived
tokens) runs attention without a mask (`KVStore.sees_all`): the same tokens and logits as the masked step, on every source and variant, and the
path is really taken where it may be and refused where it may not."""
import pytest
import torch

from dstp import DSTPConfig, PruneConfig
from dstp.config import GenerationConfig
from dstp.engine import kv_store
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.shift import ShiftPolicy
import tiny_models as tm


def test_store_is_dense_only_while_every_slot_is_valid():
    store = kv_store.KVStore(range(0, 2), 2, 1, 4, capacity=8, dtype=torch.float32, device=torch.device("cpu"))
    order = torch.arange(4).expand(2, -1)
    store.claim(0, order, torch.ones(2, 4, dtype=torch.bool))
    assert store.dense
    step = torch.full((2, 1), 4)
    store.claim(4, step, torch.ones(2, 1, dtype=torch.bool), all_valid=True)
    assert store.sees_all(4, step)
    assert not store.sees_all(3, step)  # not the newest slot
    assert not store.sees_all(0, torch.arange(5).expand(2, -1))  # several queries (prefill)
    store.grow_head(2)  # everything moves up two slots
    step = step + 0
    assert store.sees_all(6, step)  # a head no window reads costs nothing
    store.head_len, store.head_full = 2, False  # an open window whose slots are partly padding
    assert not store.sees_all(6, step)
    store.head_full = True  # every slot it reads holds a revived token
    assert store.sees_all(6, step)
    padded = kv_store.KVStore(range(0, 2), 2, 1, 4, capacity=8, dtype=torch.float32, device=torch.device("cpu"))
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])  # left padding
    padded.claim(0, order, valid)
    padded.claim(4, step, torch.ones(2, 1, dtype=torch.bool), all_valid=True)
    assert not padded.dense and not padded.sees_all(4, step)


CASES = [(None, None), ("fastv", None), ("fastv", "recompute"), ("fastv", "store"), ("fastv", "hard")]


@pytest.mark.parametrize("method,shift", CASES)
def test_unmasked_steps_equal_masked_ones(monkeypatch, method, shift):
    model = tm.tiny_llava()
    adapter = adapter_for_model(model)
    prepared = adapter.prepare(tm.llava_batch([3]))  # batch 1: no padding, the store is dense
    pruner = get_pruner(PruneConfig(method, 0.333, layer=2), adapter.n_layers) if method else None
    config = None
    if shift is not None:
        config = DSTPConfig(force_every=4, window=2, **({"variant": "hard"} if shift == "hard" else {"source": shift}))

    def run():
        policy = ShiftPolicy(config, 2) if config else None
        return Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=16), pruner=pruner,
                                        retention=0.333, shift=policy, return_logits=True)

    taken = []
    sees_all = kv_store.KVStore.sees_all
    monkeypatch.setattr(kv_store.KVStore, "sees_all",
                        lambda self, *a: taken.append((sees_all(self, *a), self.head_len > 0)) or taken[-1][0])
    fast = run()
    monkeypatch.setattr(kv_store.KVStore, "sees_all", lambda self, *a: False)
    masked = run()
    assert torch.equal(fast.tokens, masked.tokens)
    assert torch.allclose(fast.logits, masked.logits, atol=1e-5)
    assert any(t for t, _ in taken)  # the unmasked path ran
    if shift == "hard":
        assert not all(t for t, _ in taken)  # and steps with holes in the kept slots kept their mask
    elif shift is not None:  # a window reads the head's last slots, all revived tokens: no mask needed
        assert any(t for t, window in taken if window)
