"""A preallocated KV store for a group of consecutive layers that share one slot layout.

Every slot carries the ORIGINAL sequence index of its token (`order`) and a `valid` flag. Attention masks are built
from those two vectors, so slots can hold any subset of the prompt (pruned), tokens revived later (DSTP) and
generated tokens, in any physical arrangement. Writes go to slots by index; nothing is concatenated per step.

Layout:  [reserve | prompt | generated tokens ... free]. The reserve holds tokens that come and go (DSTP's dropped
visual tokens), read by attention only while their slot is valid. The front, from slot `reserve` on, is filled in
order (the prompt, then one slot per generated token) and grows by whole chunks (`GROW_CHUNK` slots) up to its
limit, so a long `max_new_tokens` costs memory only for tokens that are actually generated.

A compiled decoding step reads every slot of the store, masked by `valid`: its shapes depend only on the capacity,
which changes once per chunk, never on how many slots are filled or revived, so the step compiles to one graph (and
a CUDA graph) per capacity, and nothing in it waits on a value from the device. The eager step reads the slots up
to the new token's, as transformers' step does (the loop knows that count on the host), without a mask where none
is needed (`reads_all`): the same numbers as transformers' own decoding.

K and V are one tensor per layer, so that growing the store copies one layer at a time: the transient memory of
a growth step is one layer's buffers, not the whole store's.
"""
from __future__ import annotations

import torch

from dstp.engine.recurrent_state import LinearStep, RecurrentStates

NEVER = torch.iinfo(torch.long).max  # order tag of an empty slot
GROW_CHUNK = 256  # slots added per growth step


def allowed_keys(order: torch.Tensor, valid: torch.Tensor, query_order: torch.Tensor,
                 window: int | None = None, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, Tq, S] of queries at original indices `query_order` [B, Tq] over keys tagged
    `order` [B, S]: the valid keys at or before each query's index (and, with a sliding `window`, after its index
    - window: original indices, so a pruned or revived token is in a query's window exactly when it would be in
    the unpruned run). `blocks` [B, T] (block id of each prompt index, -1: none): a query also sees the valid keys
    after it in its own block (Gemma 4's sliding layers attend both ways inside an image)."""
    allowed = valid[:, None, :] & (order[:, None, :] <= query_order[:, :, None])
    if window is not None:
        allowed &= order[:, None, :] > query_order[:, :, None] - window
    if blocks is not None:
        T = blocks.shape[1]
        block_of = lambda i: torch.where((i >= 0) & (i < T), blocks.gather(1, i.clamp(0, T - 1)), -1)  # noqa: E731
        bq, bk = block_of(query_order), block_of(order)
        same = (bq[:, :, None] == bk[:, None, :]) & (bq[:, :, None] >= 0)
        allowed |= same & valid[:, None, :] & (order[:, None, :] > query_order[:, :, None])
    # A padding query sees nothing; let it see itself so no row is all -inf (NaN would leak into V).
    allowed |= order[:, None, :] == query_order[:, :, None]
    return allowed[:, None]


class KVStore:
    def __init__(self, layers: range, batch: int, n_kv_heads, head_dim, capacity: int,
                 dtype: torch.dtype, device: torch.device, limit: int | None = None, reserve: int = 0,
                 no_kv: frozenset = frozenset()):
        """`capacity` front slots (+ `reserve` reserve slots) are allocated now; the front may grow to `limit` slots
        (None: it never grows). `n_kv_heads`, `head_dim`: one int, or one per layer (Gemma 4's global layers have
        other head counts and sizes than its sliding ones). Layers in `no_kv` (linear attention) keep no K/V: an
        empty buffer that never grows."""
        self.layers = layers
        self.limit = capacity if limit is None else limit
        per_layer = lambda x: list(x) if isinstance(x, (list, tuple)) else [x] * len(layers)  # noqa: E731
        shapes = [(batch, h, 0 if i in no_kv else reserve + capacity, d)
                  for i, h, d in zip(layers, per_layer(n_kv_heads), per_layer(head_dim))]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.order = torch.full((batch, reserve + capacity), NEVER, dtype=torch.long, device=device)
        self.valid = torch.zeros((batch, reserve + capacity), dtype=torch.bool, device=device)
        self.reserve = reserve  # slots [0, reserve)
        self.filled = reserve  # prefill: slots [reserve, filled) hold the prompt (decoding writes past it by index)
        self.dense = True  # known on the host: every prompt slot is valid and stays so (no padding, no holes)
        self.recurrent = RecurrentStates()  # linear-attention layers' state (hybrid LLMs), set by their prefill
        # a decode-time policy that reads a subset (VisionPulse): the prompt slots a step gathers [B, W] and which of
        # them count [B, W]; the generated slots follow them. None: attention reads every slot, masked by `valid`
        self.read_index: torch.Tensor | None = None
        self.read_mask: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.order.shape[1]

    @property
    def front(self) -> int:
        return self.reserve

    def local(self, layer_idx: int) -> int:
        return layer_idx - self.layers.start

    def layer_keys(self, layer_idx: int, end: int) -> torch.Tensor:
        """[B, Hkv, end, hd] the cached (rotated) keys of slots [0, end) at `layer_idx`."""
        return self.k[self.local(layer_idx)][:, :, :end]

    def buffers(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.order, self.valid]

    # -- prefill ----------------------------------------------------------------------------------------------
    def claim(self, start: int, order: torch.Tensor, valid: torch.Tensor):
        """Tag front slots [start, start + n) with their tokens' original indices `order` [B, n] (prefill)."""
        n = order.shape[1]
        self.ensure(start + n)
        self.order[:, start:start + n] = order
        self.valid[:, start:start + n] = valid
        self.filled = max(self.filled, start + n)
        self.dense = self.dense and bool(valid.all())

    def allow_holes(self):
        """Prompt slots may be switched off while decoding (DSTP's `hard` variant): a mask is needed from now on."""
        self.dense = False

    def prefill_view(self, start: int, rows: torch.Tensor | None = None) -> "RangeView":
        """Cache view of a prefill writing slots [start, start + Q), attention reading [0, start + Q)."""
        return RangeView(self, start, rows)

    def scatter_view(self, slots: torch.Tensor, rows: torch.Tensor | None = None, returns: str = "own",
                     prefill_valid: torch.Tensor | None = None) -> "ScatterView":
        return ScatterView(self, slots, rows, returns, prefill_valid)

    def mask_upto(self, end: int, query_order: torch.Tensor, window: int | None = None,
                  blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Mask [B, 1, Tq, end] of queries over slots [0, end) (within a sliding `window`, if given; `blocks`:
        `allowed_keys`)."""
        return allowed_keys(self.order[:, :end], self.valid[:, :end], query_order, window, blocks)

    def plain_causal(self, start: int, query_order: torch.Tensor) -> bool:
        """True when the queries fill every slot attention reads, in increasing order with no padding: then a plain
        causal mask is exact and attention may take SDPA's fused causal kernel (a prefill without left padding; one
        host read)."""
        n = query_order.shape[1]
        if start != 0 or n < 2:
            return False
        order = self.order[:, :n]
        return bool(self.valid[:, :n].all()) and bool((order[:, 1:] > order[:, :-1]).all())

    # -- capacity (decided on the host: the loop knows how many tokens it has generated) -------------------------
    def ensure(self, slots: int) -> bool:
        """Room for slots up to `slots` (exclusive): whole chunks are added at the end when needed. True if it grew."""
        grew = slots > self.capacity
        if grew:
            front, need = self.capacity - self.reserve, slots - self.capacity
            if front + need > self.limit:
                raise RuntimeError(f"KV store overflow: {front + need} slots needed, limit {self.limit}")
            self._insert_slots(self.capacity, min(max(need, GROW_CHUNK), self.limit - front))
        return grew

    def grow_reserve(self, extra: int):
        """`extra` more reserve slots, free, before the others (every other slot moves up by `extra`; at prefill)."""
        if extra > 0:
            self._insert_slots(0, extra)
            self.reserve += extra
            self.filled += extra

    def _insert_slots(self, at: int, extra: int):
        """Reallocate with `extra` empty slots inserted before slot `at`, one layer at a time."""
        cap = self.capacity

        def widen(t: torch.Tensor, fill) -> torch.Tensor:
            axis = 2 if t.dim() == 4 else 1  # slots: axis 2 of a layer's K/V, axis 1 of order/valid
            if t.shape[axis] == 0:
                return t  # a layer without K/V
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

    # -- decoding (tensor arguments only: no host value changes from step to step) ------------------------------
    def append(self, slot: torch.Tensor, order: torch.Tensor, end: int | None = None) -> "SlotView":
        """Tag front slot `slot` ([1] long, the same for every row) with the new tokens' indices `order` [B, 1]
        and return the cache view that writes their K/V there and reads slots [0, end) (None: every slot)."""
        self.order.index_copy_(1, slot, order)
        self.valid.index_fill_(1, slot, True)
        if self.read_index is not None:
            return GatherView(self, slot, self.capacity if end is None else end)
        return SlotView(self, slot, self.capacity if end is None else end)

    def decode_mask(self, end: int | None = None, query_order: torch.Tensor | None = None,
                    window: int | None = None) -> torch.Tensor:
        """[B, 1, 1, end]: what one new token per row attends to among slots [0, end), every valid one (all of
        them come before it); with a sliding `window`, only those tagged after `query_order` [B, 1] - window. With a
        read set: over the gathered prompt slots, then the generated ones."""
        if self.read_index is not None:
            end = self.capacity if end is None else end
            valid = torch.cat([self.valid.gather(1, self.read_index) & self.read_mask, self.valid[:, self.filled:end]], 1)
            order = torch.cat([self.order.gather(1, self.read_index), self.order[:, self.filled:end]], 1)
        else:
            valid, order = self.valid[:, :end], self.order[:, :end]
        if window is not None:
            valid = valid & (order > query_order - window)
        return valid[:, None, None, :]

    def read_prompt(self, index: torch.Tensor, mask: torch.Tensor):
        """From now on a decoding step reads only the prompt slots `index` [B, W] (those in `mask` [B, W] count) and
        the generated slots: its attention gathers their K/V, W + generated slots wide, instead of reading every
        slot masked. The policy owns both tensors (and counts them) and rewrites them in place each step (fixed
        shapes: the step stays one graph)."""
        self.read_index, self.read_mask = index, mask

    def reads_all(self, end: int | None) -> bool:
        """True when a decoding step reading slots [0, end) may attend to every one of them without a mask: the end
        is the new token's slot + 1, no reserve, and every prompt slot valid. Then SDPA runs its unmasked kernel, as
        transformers' decoding step does (and on CPU a mask costs as much as the attention)."""
        return end is not None and self.reserve == 0 and self.dense and self.read_index is None

    # -- the reserve (DSTP is its client) --------------------------------------------------------------------------
    def reserve_tags(self) -> torch.Tensor:
        """[B, reserve] original index of the token in each reserve slot (NEVER: free)."""
        return self.order[:, :self.reserve]

    def tag_reserve(self, tags: torch.Tensor):
        """Which token each reserve slot holds ([B, reserve]; NEVER: free). The slots stay unread until activated."""
        self.order[:, :self.reserve] = tags
        self.valid[:, :self.reserve] = False

    def activate_reserve(self, active: torch.Tensor):
        """Attention reads exactly the reserve slots in `active` [B, reserve] from now on."""
        self.valid[:, :self.reserve] = active

    def prompt_valid(self, n: int) -> torch.Tensor:
        """[B, n] validity of the first n front slots (the kept prompt)."""
        return self.valid[:, self.reserve:self.reserve + n]

    def set_prompt_valid(self, valid: torch.Tensor):
        """Validity of the first valid.shape[1] front slots (DSTP's `hard` variant takes kept tokens out)."""
        self.valid[:, self.reserve:self.reserve + valid.shape[1]] = valid

    def prompt_tags(self, n: int) -> torch.Tensor:
        return self.order[:, self.reserve:self.reserve + n]

    def prompt_mask(self, query_order: torch.Tensor, prompt_valid: torch.Tensor, own: torch.Tensor,
                    window: int | None = None, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """Mask [B, 1, Q, capacity] of queries at original indices `query_order` [B, Q] that attend causally to the
        prompt slots valid in `prompt_valid` [B, n] (the first n front slots; within a sliding `window`, if given)
        and to their own slot `own` [B, Q]."""
        keys_valid = torch.zeros_like(self.valid)
        keys_valid[:, self.front:self.front + prompt_valid.shape[1]] = prompt_valid
        slot = torch.arange(self.capacity, device=own.device)[None, None, :] == own[:, :, None]
        return allowed_keys(self.order, keys_valid, query_order, window, blocks) | slot[:, None]

    def reserve_nbytes(self) -> tuple[int, int]:
        """(bytes of the front, bytes of the reserve) as allocated: the slot axis divides every buffer."""
        total = sum(t.untyped_storage().nbytes() for t in self.buffers())
        reserve = total // self.capacity * self.reserve
        return total - reserve, reserve


class RangeView:
    """A prefill's cache view: `update` writes this call's K/V into slots [start, start + Q) (only for `rows`, bool
    [B] or [B, Q], when given) and returns slots [0, start + Q)."""

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
        return k[:, :, :end], v[:, :, :end]

    def linear_step(self, layer_idx: int, n: int) -> LinearStep:
        """A linear-attention layer's prefill over slots [start, start + n): its state starts from zero, its
        padding is the slots' validity (padding comes first in every layout the engine builds)."""
        if self.rows is not None or self.start != self.store.reserve:
            raise NotImplementedError("a linear-attention layer cannot run a partial prefill (its state holds "
                                      "every token before)")
        mask = self.store.valid[:, self.start:self.start + n]
        return LinearStep(self.store.recurrent, layer_idx, prefill=True, mask=mask)

    # transformers calls these on some code paths; the store has no notion of a global length.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def get_mask_sizes(self, *args, **kwargs):
        return self.start, 0


class SlotView:
    """A decoding step's cache view: `update` writes the new token's K/V into slot `slot` ([1] long tensor) and
    returns slots [0, end)."""

    def __init__(self, store: KVStore, slot: torch.Tensor, end: int):
        self.store, self.slot, self.end = store, slot, end

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s, li = self.store, self.store.local(layer_idx)
        s.k[li].index_copy_(2, self.slot, key_states)
        s.v[li].index_copy_(2, self.slot, value_states)
        return s.k[li][:, :, :self.end], s.v[li][:, :, :self.end]

    def linear_step(self, layer_idx: int, n: int) -> LinearStep:
        """A linear-attention layer's decoding step: one new token per row, the state updated in place."""
        return LinearStep(self.store.recurrent, layer_idx, prefill=False)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.end

    def get_mask_sizes(self, *args, **kwargs):
        return self.end, 0


class GatherView(SlotView):
    """A decoding step's cache view over a read set (`KVStore.read_prompt`): writes the new token's K/V into slot
    `slot` and returns the K/V of the gathered prompt slots, then of the generated slots up to `end`."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s, li = self.store, self.store.local(layer_idx)
        s.k[li].index_copy_(2, self.slot, key_states)
        s.v[li].index_copy_(2, self.slot, value_states)
        B, H, _, hd = key_states.shape
        index = s.read_index[:, None, :, None].expand(B, H, -1, hd)
        return tuple(torch.cat([buf.gather(2, index), buf[:, :, s.filled:self.end]], 2) for buf in (s.k[li], s.v[li]))


class ScatterView:
    """A cache view that writes each query's K/V to its own slot (`slots` [B, Tq]; only where `rows` [B, Tq], when
    given). `returns`: "own" hands back this call's K/V as they came (a prefill over the whole sequence in its own
    order while the store receives it in its layout); "all": every slot of the store (queries attending to it)."""

    def __init__(self, store: KVStore, slots: torch.Tensor, rows: torch.Tensor | None = None, returns: str = "own",
                 prefill_valid: torch.Tensor | None = None):
        self.store, self.slots, self.rows, self.returns = store, slots, rows, returns
        self.prefill_valid = prefill_valid  # [B, Tq]: the queries are a whole prompt in order (its validity)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        s, li = self.store, self.store.local(layer_idx)
        index = self.slots[:, None, :, None].expand_as(key_states)
        for buf, new in ((s.k[li], key_states), (s.v[li], value_states)):
            if self.rows is not None:
                new = torch.where(self.rows[:, None, :, None], new, buf.gather(2, index))
            buf.scatter_(2, index, new)
        if self.returns == "all":
            return s.k[li], s.v[li]
        return key_states, value_states

    def linear_step(self, layer_idx: int, n: int) -> LinearStep:
        """A linear-attention layer's prefill over a whole prompt in order (the `store` source's unpruned run); its
        state is the store's. Tokens scattered into some slots cannot enter a recurrence."""
        if self.prefill_valid is None or self.rows is not None or self.returns != "own":
            raise NotImplementedError("a linear-attention layer cannot take tokens into scattered slots (its state "
                                      "is a recurrence over the sequence in order)")
        return LinearStep(self.store.recurrent, layer_idx, prefill=True, mask=self.prefill_valid)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs):
        return self.slots.shape[1], 0
