"""A preallocated KV store for a group of consecutive layers that share one slot layout.

Every slot carries the ORIGINAL sequence index of its token (`order`) and a `valid` flag. Attention masks
are built from those two vectors, so slots can hold any subset of the prompt (pruned), tokens revived
later (DSTP) and generated tokens, in any physical arrangement. Writes go to slot ranges by index;
nothing is concatenated per step.

Layout:  [head | prompt | generated tokens ... free]. The front part, from slot `head` on, is filled in order
(the prompt, then one slot per generated token) and grows by whole chunks (`GROW_CHUNK` slots) up to its limit,
so a long `max_new_tokens` costs memory only for tokens that are actually generated. The head holds tokens that
come and go (DSTP's reserve of dropped visual tokens); attention reads its last `head_len` slots, next to the
prompt, so a store with an open revival window is still one contiguous range of slots, `[head - head_len, used)`.

K and V are one tensor per layer, so that growing the store copies one layer at a time: the transient memory of
a growth step is one layer's buffers, not the whole store's.
"""
from __future__ import annotations

import torch

NEVER = torch.iinfo(torch.long).max  # order tag of an empty slot
GROW_CHUNK = 256  # slots added per growth step


def allowed_keys(order: torch.Tensor, valid: torch.Tensor, query_order: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, Tq, S] of queries at original indices `query_order` [B, Tq] over keys tagged
    `order` [B, S]: the valid keys at or before each query's index."""
    allowed = valid[:, None, :] & (order[:, None, :] <= query_order[:, :, None])
    # A padding query sees nothing; let it see itself so no row is all -inf (NaN would leak into V).
    allowed |= order[:, None, :] == query_order[:, :, None]
    return allowed[:, None]


class KVStore:
    def __init__(self, layers: range, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, limit: int | None = None, head: int = 0):
        """`capacity` front slots (+ `head` head slots) are allocated now; the front may grow to `limit` slots
        (None: it never grows)."""
        self.layers = layers
        self.limit = capacity if limit is None else limit
        shape = (batch, n_kv_heads, head + capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.order = torch.full((batch, head + capacity), NEVER, dtype=torch.long, device=device)
        self.valid = torch.zeros((batch, head + capacity), dtype=torch.bool, device=device)
        self.head = head  # slots [0, head): the head
        self.used = head  # slots [head, used) are filled (prompt, then generated tokens)
        self.head_len = 0  # attention reads the head's last head_len slots; while 0, the head costs nothing
        self.head_full = True  # known on the host: every slot of [head - head_len, head) holds a valid token
        self.dense = True  # known on the host: every slot in [head, used) holds a valid token (no padding, holes)

    @property
    def capacity(self) -> int:
        return self.order.shape[1]

    @property
    def lo(self) -> int:
        """First slot attention reads."""
        return self.head - self.head_len

    def local(self, layer_idx: int) -> int:
        return layer_idx - self.layers.start

    def claim(self, start: int, order: torch.Tensor, valid: torch.Tensor, all_valid: bool | None = None):
        """Tag front slots [start, start + n) with their tokens' original indices `order` [B, n]. `all_valid`:
        whether every claimed slot is valid, when the caller knows (decoding); else it is read from `valid` (one
        host read: prefill)."""
        n = order.shape[1]
        if start + n > self.capacity:
            self.grow(start + n - self.capacity)
        self.order[:, start:start + n] = order
        self.valid[:, start:start + n] = valid
        self.used = max(self.used, start + n)
        self.dense = self.dense and (bool(valid.all()) if all_valid is None else all_valid)

    def grow(self, need: int):
        """Room for `need` more front slots: at least one more chunk at the end."""
        front = self.capacity - self.head
        if front + need > self.limit:
            raise RuntimeError(f"KV store overflow: {front + need} slots needed, limit {self.limit}")
        self._insert_slots(self.capacity, min(max(need, GROW_CHUNK), self.limit - front))

    def grow_head(self, extra: int):
        """`extra` more head slots, empty, before the others (every other slot moves up by `extra`)."""
        if extra > 0:
            self._insert_slots(0, extra)
            self.head += extra
            self.used += extra

    def _insert_slots(self, at: int, extra: int):
        """Reallocate with `extra` empty slots inserted before slot `at` (contents and tags of the others kept),
        one layer at a time."""
        cap = self.capacity

        def widen(t: torch.Tensor, fill) -> torch.Tensor:
            axis = 2 if t.dim() == 4 else 1  # slots: axis 2 of a layer's K/V, axis 1 of order/valid
            shape = list(t.shape)
            shape[axis] = cap + extra
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out.narrow(axis, 0, at).copy_(t.narrow(axis, 0, at))
            out.narrow(axis, at + extra, cap - at).copy_(t.narrow(axis, at, cap - at))
            return out

        for buffers in (self.k, self.v):
            for i in range(len(buffers)):
                buffers[i] = widen(buffers[i], 0)
        self.order, self.valid = widen(self.order, NEVER), widen(self.valid, False)

    def mask(self, query_order: torch.Tensor) -> torch.Tensor:
        """Boolean attention mask [B, 1, Tq, used - lo] over the slots attention reads."""
        return allowed_keys(self.order[:, self.lo: self.used], self.valid[:, self.lo: self.used], query_order)

    def plain_causal(self, start: int, query_order: torch.Tensor) -> bool:
        """True when the queries fill every slot attention reads, in increasing order with no padding: then a
        plain causal mask is exact and attention may use SDPA's fused causal path (prefill without left padding)."""
        n = query_order.shape[1]
        if start != self.lo or self.used - self.lo != n or n < 2:
            return False
        order = self.order[:, start:start + n]
        return bool(self.valid[:, start:start + n].all()) and bool((order[:, 1:] > order[:, :-1]).all())

    def sees_all(self, start: int, query_order: torch.Tensor) -> bool:
        """True when one query per row, in the last slot used, may attend to every slot attention reads: the
        front is dense, the head's read slots are all valid, and the query comes after every token (a decoding
        step). Then no mask is exact, and SDPA runs its unmasked kernel (the mask costs as much as the attention
        on CPU)."""
        return (query_order.shape[1] == 1 and self.dense and (self.head_len == 0 or self.head_full)
                and start == self.used - 1)

    def view(self, start: int, rows: torch.Tensor | None = None) -> "LayerCacheView":
        return LayerCacheView(self, start, rows)


class LayerCacheView:
    """What a HF attention module sees as its cache: `update` writes this step's K/V into the slots
    [start, start + Tq) and returns every slot attention reads. `rows` (bool [B], or [B, Tq]) restricts the write
    to some rows (or some queries of each row)."""

    def __init__(self, store: KVStore, start: int, rows: torch.Tensor | None):
        self.store, self.start, self.rows = store, start, rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s, li = self.store, self.store.local(layer_idx)
        end = self.start + key_states.shape[2]
        k, v = s.k[li], s.v[li]
        if self.rows is None:
            k[:, :, self.start:end] = key_states
            v[:, :, self.start:end] = value_states
        else:
            keep = self.rows[:, None, :, None] if self.rows.dim() == 2 else self.rows[:, None, None, None]
            k[:, :, self.start:end] = torch.where(keep, key_states, k[:, :, self.start:end])
            v[:, :, self.start:end] = torch.where(keep, value_states, v[:, :, self.start:end])
        return k[:, :, s.lo: s.used], v[:, :, s.lo: s.used]

    # transformers calls these on some code paths; the store has no notion of a global length.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.store.used - self.store.lo

    def get_mask_sizes(self, *args, **kwargs):
        return self.store.used - self.store.lo, 0


class ScatterView:
    """A prefill's cache view over the whole sequence (nothing cached before it): `update` writes each query's K/V
    to its own slot (`slots` [B, Tq]) and returns this step's K/V as they came, so attention runs in the
    sequence's own order while the store receives them in its layout."""

    def __init__(self, store: KVStore, slots: torch.Tensor):
        self.store, self.slots = store, slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s, li = self.store, self.store.local(layer_idx)
        index = self.slots[:, None, :, None].expand_as(key_states)
        s.k[li].scatter_(2, index, key_states)
        s.v[li].scatter_(2, index, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs):
        return self.slots.shape[1], 0
