"""A preallocated KV store for a group of consecutive layers that share one slot layout.

Every slot carries the ORIGINAL sequence index of its token (`order`) and a `valid` flag. Attention masks
are built from those two vectors, so slots can hold any subset of the prompt (pruned), tokens revived
later (DSTP) and generated tokens, in any physical arrangement. Writes go to slot ranges by index;
nothing is concatenated per step. The store starts with room for the prompt and a first chunk of generated
tokens and grows by whole chunks (one copy per `GROW_CHUNK` tokens) up to its limit, so a long `max_new_tokens`
costs memory only for tokens that are actually generated.
"""
from __future__ import annotations

import torch

NEVER = torch.iinfo(torch.long).max  # order tag of an empty slot
GROW_CHUNK = 256  # slots added per growth step


class KVStore:
    def __init__(self, layers: range, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, limit: int | None = None):
        """`capacity` slots are allocated now; the store may grow to `limit` slots (None: it never grows)."""
        self.layers = layers
        self.limit = capacity if limit is None else limit
        shape = (len(layers), batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.order = torch.full((batch, capacity), NEVER, dtype=torch.long, device=device)
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.used = 0  # slots [0, used) are filled from the front (prompt, then generated tokens)
        self.tail = capacity  # slots [tail, capacity) are filled on demand (DSTP revival)
        self.tail_len = 0  # slots [tail, tail + tail_len) are attended too; while 0, the tail costs nothing
        self.dense = True  # known on the host: every slot in [0, used) holds a valid token (no padding, no holes)

    @property
    def capacity(self) -> int:
        return self.order.shape[1]

    def local(self, layer_idx: int) -> int:
        return layer_idx - self.layers.start

    def claim(self, start: int, order: torch.Tensor, valid: torch.Tensor, all_valid: bool | None = None):
        """Tag slots [start, start + n) with their tokens' original indices `order` [B, n]. `all_valid`: whether
        every claimed slot is valid, when the caller knows (decoding); else it is read from `valid` (one host
        read: prefill)."""
        n = order.shape[1]
        if start + n > self.tail:
            self.grow(start + n - self.tail)
        self.order[:, start:start + n] = order
        self.valid[:, start:start + n] = valid
        self.used = max(self.used, start + n)
        self.dense = self.dense and (bool(valid.all()) if all_valid is None else all_valid)

    def grow(self, need: int):
        """Make room for `need` more front slots: reallocate with at least one more chunk, the tail moved to the
        new end (its slots keep their contents and tags)."""
        if self.capacity + need > self.limit:
            raise RuntimeError(f"KV store overflow: {self.capacity + need} slots needed, limit {self.limit}")
        extra = min(max(need, GROW_CHUNK), self.limit - self.capacity)
        self._insert_slots(self.tail, extra)
        self.tail += extra

    def add_tail(self, n: int):
        """Append n empty tail slots (DSTP revival) to a store created without any: one reallocation. A store of
        an earlier pruning stage learns how many it needs only once the final stage's set is known."""
        if n <= 0:
            return
        if self.tail != self.capacity:
            raise RuntimeError("add_tail: this store already has a tail")
        self._insert_slots(self.capacity, n)
        self.limit += n
        self.reserve_tail(n)

    def _insert_slots(self, at: int, extra: int):
        """Reallocate with `extra` empty slots inserted before slot `at` (contents and tags of the others kept)."""
        cap = self.capacity

        def widen(t: torch.Tensor, fill) -> torch.Tensor:
            axis = t.dim() - 2 if t.dim() == 5 else 1  # slots: axis 3 of K/V, axis 1 of order/valid
            shape = list(t.shape)
            shape[axis] = cap + extra
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out.narrow(axis, 0, at).copy_(t.narrow(axis, 0, at))
            out.narrow(axis, at + extra, cap - at).copy_(t.narrow(axis, at, cap - at))
            return out

        self.k, self.v = widen(self.k, 0), widen(self.v, 0)
        self.order, self.valid = widen(self.order, NEVER), widen(self.valid, False)

    def reserve_tail(self, n: int):
        """Set the last n slots aside, empty, for tokens that come and go (DSTP revival)."""
        self.tail = self.capacity - n
        tags = -1 - torch.arange(self.tail, self.capacity, device=self.order.device)  # unique: pads see themselves
        self.order[:, self.tail:] = tags
        self.valid[:, self.tail:] = False

    @property
    def span(self) -> int:
        """How many leading slots attention reads."""
        return self.tail + self.tail_len if self.tail_len else self.used

    def mask(self, query_order: torch.Tensor) -> torch.Tensor:
        """Boolean attention mask [B, 1, Tq, span]: valid slots at or before each query's index."""
        order, valid = self.order[:, : self.span], self.valid[:, : self.span]
        allowed = valid[:, None, :] & (order[:, None, :] <= query_order[:, :, None])
        # A padding query sees nothing; let it see itself so no row is all -inf (NaN would leak into V).
        allowed |= order[:, None, :] == query_order[:, :, None]
        return allowed[:, None]

    def plain_causal(self, start: int, query_order: torch.Tensor) -> bool:
        """True when the queries fill slots [0, span) in increasing order with no padding: then a plain causal
        mask is exact and attention may use SDPA's fused causal path (prefill without left padding)."""
        n = query_order.shape[1]
        if start != 0 or self.span != n or n < 2:
            return False
        order = self.order[:, :n]
        return bool(self.valid[:, :n].all()) and bool((order[:, 1:] > order[:, :-1]).all())

    def sees_all(self, start: int, query_order: torch.Tensor) -> bool:
        """True when one query per row, in the last slot used, may attend to every slot attention reads: the
        store is dense, no revival tail is open, and the query comes after every token (a decoding step). Then
        no mask is exact, and SDPA runs its unmasked kernel (the mask costs as much as the attention on CPU)."""
        return query_order.shape[1] == 1 and self.dense and self.tail_len == 0 and start == self.used - 1

    def view(self, start: int, rows: torch.Tensor | None = None) -> "LayerCacheView":
        return LayerCacheView(self, start, rows)


class LayerCacheView:
    """What a HF attention module sees as its cache: `update` writes this step's K/V into the slots
    [start, start + Tq) and returns every slot in use. `rows` (bool [B]) restricts the write to some rows."""

    def __init__(self, store: KVStore, start: int, rows: torch.Tensor | None):
        self.store, self.start, self.rows = store, start, rows

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        s, li = self.store, self.store.local(layer_idx)
        end = self.start + key_states.shape[2]
        if self.rows is None:
            s.k[li, :, :, self.start:end] = key_states
            s.v[li, :, :, self.start:end] = value_states
        else:
            keep = self.rows[:, None, None, None]
            s.k[li, :, :, self.start:end] = torch.where(keep, key_states, s.k[li, :, :, self.start:end])
            s.v[li, :, :, self.start:end] = torch.where(keep, value_states, s.v[li, :, :, self.start:end])
        return s.k[li, :, :, : s.span], s.v[li, :, :, : s.span]

    # transformers calls these on some code paths; the store has no notion of a global length.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.store.span

    def get_mask_sizes(self, *args, **kwargs):
        return self.store.span, 0
