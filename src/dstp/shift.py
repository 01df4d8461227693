"""DSTP: decoding-stage shift-aware token pruning (DESIGN §5).

Per sequence: the prefill kept set S0, the reserve R (every other visual token) and an anchor a0, the last
prompt token's head-mean attention over S0 at the probe layer p. At each decoding step:
  RISD  a_l = the new token's attention over S0 at p (softmax over S0); shift when cos(a_l, a0) < tau.
  CPTS  on a shift, attention over R (its own softmax) joins a_l; the top-k over S0 u R is T_l and the
        active set becomes S0 u T_l for `window` steps, this one included; then back to S0.
Revived tokens get K/V at layers >= P from their hidden states at P (`recompute`) or from an unpruned
prefill (`store`). They wait in the head of each pruned stage's KV store, [head | kept prompt | generated]; a
window moves its revived tokens to the head's last slots, next to the prompt, so attention reads one
contiguous range of slots and no K/V is copied out of a reserve. Every row shifts independently.

Multi-stage pruners: S0 is the final stage's set, R every other visual token. A revived token gets K/V in the
head of every stage from the first one that dropped it (`recompute`: from its hidden state at that stage's
prune point, through that stage's layers and every later one, attending at each stage to the text and the
visual tokens that stage kept).

Host synchronisation: one per decoding step. CPTS's candidate set is computed for every row at every step (one
query row over the visual keys and a top-k, on the device), so a single read brings back everything the host
needs to decide: whether any row shifted or closed its window, how many head slots each stage's attention reads
and whether they are all valid, and (`recompute`) how many tokens to compute, from which stage, and how large
each head must be.

`store`: each stage's head holds every visual token the stage dropped, with the unpruned prefill's K/V, so the
KV memory is the unpruned model's (DESIGN §5: an unpruned prefill); a window swaps its tokens into place.
`recompute`: each head holds the revived tokens computed so far (their K/V computed in place, in the head's last
slots), grown by `CACHE_CHUNK` slots up to `DSTPConfig.cache_tokens` tokens per sequence (default: the reserve,
so nothing is ever evicted). When a shift needs tokens and the bound is reached, the tokens least recently
revived that the shift does not revive are evicted; an evicted token is recomputed if it is revived again (same
K/V: its inputs do not change).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dstp.config import DSTPConfig
from dstp.engine.kv_store import NEVER
from dstp.engine.prune_context import first_true, topk_mask
from dstp.engine.trace import StepTrace
from dstp.errors import ConfigError

CACHE_CHUNK = 64  # recompute: head slots added per growth step
PAD_QUERY = -(1 << 40)  # order tags of padding queries while revived K/V are computed (each sees only itself)


@dataclass
class ShiftState:
    probe: int
    keys: torch.Tensor | None  # P = 0: [B, Hkv, Nmax, hd] layer-0 keys of every visual token; else the store's
    anchor: torch.Tensor  # [B, Nmax] a0, zero outside S0
    k: torch.Tensor  # [B] budget
    remaining: torch.Tensor  # [B] window steps left (0: inactive)
    in_window: torch.Tensor  # [B] bool: the active set differs from S0
    revived: torch.Tensor  # [B, Nmax] bool: tokens revived by the current window
    base_valid: list  # per stage, [B, Tk] validity of its kept prompt slots at prefill
    slot_rank: list  # per stage, [B, Tk] visual rank held by each kept slot (-1: text or padding)
    rank_of_pos: torch.Tensor  # [B, T] visual rank of each prompt position (-1: text or padding)
    dropped_by: list  # per stage, [B, Nmax] bool: the visual tokens it does not hold (its reserve)
    head_kind: str  # what the heads are, as `Engine.held_bytes` reports them
    generator: torch.Generator
    history: list
    # recompute: which visual tokens have K/V in the heads, and when each was last revived (LRU)
    cached: torch.Tensor | None = None  # [B, Nmax] bool
    last_revived: torch.Tensor | None = None  # [B, Nmax] step
    cache_bound: int = 0
    extra_flops: float = 0.0
    detect_seconds: float = 0.0
    revive_seconds: float = 0.0


class ShiftPolicy:
    def __init__(self, config: DSTPConfig, prune_layer: int):
        self.config, self.P = config, prune_layer

    # -- what the engine asks before and during prefill ---------------------------------------
    def probe_layer(self, P: int, L: int) -> int:
        p = self.config.probe_layer
        if p is None:
            return max(P - 1, 0)
        if P > 0 and p >= P:
            raise ConfigError(f"DSTP probe_layer {p} must be below the prune layer {P}, where every visual key exists")
        if P == 0 and p != 0:
            raise ConfigError("with a pruner before the LLM (layer 0), DSTP probes layer 0; leave probe_layer unset")
        return p

    @property
    def needs_full_kv(self) -> bool:
        return self.config.source == "store"

    def revival_slots(self, state) -> int:
        """R: how many visual tokens one shift may revive per sequence."""
        n = state.visual_valid.sum(-1)
        k = state.kept.sum(-1)
        room = int((n - k).max())
        if self.config.variant == "all_tokens":
            r = room
        else:
            r = min(int(k.max()), room)
        if self.config.max_revived is not None:
            r = min(r, self.config.max_revived)
        return max(r, 0)

    def setup(self, engine, state, probe_hidden) -> ShiftState:
        a = engine.adapter
        p = self.probe_layer(state.P, a.n_layers)
        vpos = state.visual_pos
        B, N = vpos.shape
        hid = probe_hidden  # the probe layer's input: [B, 1, D] of the last prompt token (P = 0: [B, T, D], the
        # embeddings the first stage kept)
        keys = None
        if state.P == 0:  # the probe layer is pruned: its keys of the reserve exist nowhere else
            hd = state.cos.shape[-1]
            idx_hd = vpos[..., None].expand(-1, -1, hd)
            hv = hid.gather(1, vpos[..., None].expand(-1, -1, hid.shape[-1]))
            keys = a.key(0, hv, state.cos.gather(1, idx_hd), state.sin.gather(1, idx_hd))
        q_last = a.query(p, hid[:, -1:], state.cos[:, -1:], state.sin[:, -1:])
        anchor = self._attend(self._scores(engine, state, p, keys, q_last), state.kept)
        # which visual rank each kept slot of each stage holds
        rank_of_pos = torch.full((B, state.T), -1, dtype=torch.long, device=vpos.device)
        rank_of_pos.scatter_(1, vpos, torch.arange(N, device=vpos.device).expand(B, N).masked_fill(~state.visual_valid, -1))
        base_valid, slot_rank = [], []
        for stage in state.stages:
            s = stage.store
            order = s.order[:, s.head:s.head + stage.Tk]
            base_valid.append(s.valid[:, s.head:s.head + stage.Tk].clone())
            slot_rank.append(torch.where(order >= 0, rank_of_pos.gather(1, order.clamp(min=0)), -1))
        return ShiftState(
            probe=p, keys=keys, anchor=anchor, k=state.kept.sum(-1),
            remaining=torch.zeros(B, dtype=torch.long, device=vpos.device),
            in_window=torch.zeros(B, dtype=torch.bool, device=vpos.device),
            revived=torch.zeros(B, N, dtype=torch.bool, device=vpos.device),
            base_valid=base_valid, slot_rank=slot_rank, rank_of_pos=rank_of_pos,
            dropped_by=[state.visual_valid & ~stage.kept for stage in state.stages],
            head_kind="reserve" if self.config.source == "store" else "dstp_cache",
            generator=torch.Generator(device=vpos.device).manual_seed(self.config.seed), history=[],
            **self._revived_cache(state))

    def _revived_cache(self, state) -> dict:
        """`recompute`: nothing computed yet, and the bound: `cache_tokens`, or the largest reserve."""
        if self.config.source != "recompute" or state.R == 0:
            return {}
        reserve = int((state.visual_valid & ~state.kept).sum(-1).max())
        bound = reserve if self.config.cache_tokens is None else min(self.config.cache_tokens, reserve)
        if bound < state.R:
            raise ConfigError(f"DSTP cache_tokens={self.config.cache_tokens} is below the {state.R} tokens one shift "
                              f"may revive per sequence: they must fit (raise cache_tokens or lower max_revived)")
        shape = state.visual_valid.shape
        return dict(cached=torch.zeros(shape, dtype=torch.bool, device=state.kept.device), cache_bound=bound,
                    last_revived=torch.full(shape, -1, dtype=torch.long, device=state.kept.device))

    @staticmethod
    def _scores(engine, state, p: int, keys, q: torch.Tensor) -> torch.Tensor:
        """Scaled attention logits [B, H, Nmax] of one query row q [B, H, 1, hd] at the probe layer p on every
        visual token: from `keys` (P = 0), else from the keys the store of layers < P holds (all prompt slots,
        then the visual ones picked: no copy of the keys is kept)."""
        a = engine.adapter
        if keys is None:
            keys = state.full.k[state.full.local(p)][:, :, :state.T]
        B, H, _, hd = q.shape
        Hkv = keys.shape[1]
        scores = (q.reshape(B, Hkv, H // Hkv, hd).float() @ keys.float().transpose(-1, -2)).reshape(B, H, -1)
        scores = scores * a.attention_scale(p)
        if state.P > 0:
            scores = scores.gather(2, state.visual_pos[:, None, :].expand(-1, H, -1))
        return scores

    @staticmethod
    def _attend(scores: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
        """Head-mean softmax attention [B, N] of scores [B, H, N] over the tokens in `over` (zero elsewhere)."""
        probs = torch.softmax(scores.masked_fill(~over[:, None, :], float("-inf")), dim=-1)
        return probs.nan_to_num(0.0).mean(1)

    # -- each decoding step ---------------------------------------------------------------------
    def step(self, engine, state, q_probe) -> StepTrace:
        cfg, st = self.config, state.shift_state
        t0 = time.perf_counter()
        kept, valid = state.kept, state.visual_valid
        # detection: one query row against the visual keys at the probe layer, softmaxed over S0
        scores = self._scores(engine, state, st.probe, st.keys, q_probe)
        a_l = self._attend(scores, kept)
        sim = torch.nn.functional.cosine_similarity(a_l, st.anchor, dim=-1)
        shift = torch.ones_like(sim, dtype=torch.bool) if cfg.variant == "every_step" else sim < cfg.tau
        if cfg.force_every is not None and state.step % cfg.force_every == 0:
            shift = torch.ones_like(shift)
        expired = (st.remaining == 0) & st.in_window & ~shift
        # CPTS for every row, whether or not one shifted: then one read tells the host all it must know
        a_r = self._attend(scores, valid & ~kept)
        target = self._target(torch.where(kept, a_l, a_r), valid, st)
        revive = target & ~kept & shift[:, None]
        rank, rvalid = first_true(revive, state.R)  # at most R revived per row, in rank order
        new_revived = torch.zeros_like(revive).scatter(1, rank, rvalid) & revive
        t1 = time.perf_counter()
        st.detect_seconds += t1 - t0

        plan = self._plan(state, shift, expired, new_revived).tolist()  # the step's one host synchronisation
        S = len(state.stages)
        any_shift, any_expired, reads, full, work = plan[0], plan[1], plan[2:2 + S], plan[2 + S:2 + 2 * S], \
            plan[2 + 2 * S:]
        if any_expired:
            self._deactivate(state, expired)
        if any_shift:
            self._activate(engine, state, shift, target, new_revived, reads, work)
            st.remaining = torch.where(shift, torch.full_like(st.remaining, cfg.window), st.remaining)
            st.in_window |= shift
        for stage, n, f in zip(state.stages, reads, full):
            stage.store.head_len, stage.store.head_full = n, bool(f)
        st.revive_seconds += time.perf_counter() - t1
        active = self._active_count(state)
        st.history.append((shift, st.revived.clone() if any_shift else None))
        st.remaining = (st.remaining - 1).clamp(min=0)
        return StepTrace(visual_attended=active, similarity=sim, shift=shift, active=active)

    def _target(self, scores, valid, st) -> torch.Tensor:
        """T_l: the visual tokens to have active in the window (before the S0 union)."""
        v = self.config.variant
        if v == "all_tokens":
            return valid
        if v == "random":
            noise = torch.rand(scores.shape, generator=st.generator).to(scores.device)
            return topk_mask(noise, valid, st.k)
        return topk_mask(scores, valid, st.k)

    def _plan(self, state, shift, expired, new_revived) -> torch.Tensor:
        """What the host needs from this step, as one int tensor: [any row shifts, any window closes, per stage
        the head slots attention reads after the step, per stage whether they are all valid, then (recompute)
        tokens to compute (max over rows), the first stage they start in, per stage the head slots needed, per
        stage the tokens computed there (max over rows)]. A row's window reads exactly its revived tokens, the valid
        slots at the end of each head."""
        st = state.shift_state
        S = len(state.stages)
        recompute = st.cached is not None
        if recompute:
            need = new_revived & ~st.cached
            count = need.sum(-1)
            m, first = count.max(), torch.where(need, state.dropped_at, S).min()
            room = torch.minimum(st.cached.sum(-1), st.cache_bound - count)  # tokens held after evictions
        reads, full, sizes, widths = [], [], [], []
        for i, stage in enumerate(state.stages):
            s, D = stage.store, st.dropped_by[i]
            span = (new_revived & D).sum(-1)
            if recompute:
                new = (need & D).sum(-1)
                sizes.append(torch.where(new > 0, torch.minimum((st.cached & D).sum(-1), room) + new, 0).max())
                widths.append(new.max())
            span = torch.where(shift, span, torch.where(expired, 0, s.valid[:, :s.head].sum(-1)))
            reads.append(span.max())
            full.append((span == span.max()).all())
        parts = [shift.any(), expired.any(), *reads, *full]
        if recompute:
            parts += [m, first, *sizes, *widths]
        return torch.stack([torch.as_tensor(p, device=shift.device).long() for p in parts])

    def _deactivate(self, state, rows):
        st = state.shift_state
        for stage, base in zip(state.stages, st.base_valid):
            s, H = stage.store, stage.store.head
            s.valid[:, :H] &= ~rows[:, None]
            s.valid[:, H:H + stage.Tk] = torch.where(rows[:, None], base, s.valid[:, H:H + stage.Tk])
        st.revived &= ~rows[:, None]
        st.in_window &= ~rows

    @staticmethod
    def _head_ranks(state, s) -> torch.Tensor:
        """[B, head] visual rank of the token in each head slot of store s (-1: a free slot)."""
        st, tags = state.shift_state, s.order[:, :s.head]
        inside = (tags >= 0) & (tags < state.T)
        return torch.where(inside, st.rank_of_pos.gather(1, tags.clamp(0, state.T - 1)), -1)

    def _activate(self, engine, state, rows, target, new_revived, reads, work):
        """Open windows for `rows`: bring `new_revived` into the head's last slots of every stage that dropped
        them (`recompute`: computing in place those it does not hold yet); `reads`: each stage's head slots read
        after the step; `work`: the recompute part of the step's plan."""
        st, cfg = state.shift_state, self.config
        if state.R > 0:
            st.revived = torch.where(rows[:, None], new_revived, st.revived)
            S = len(state.stages)
            m, start, sizes, widths, need = 0, S, [], [], None
            if st.cached is not None:
                m, start, sizes, widths = work[0], work[1], work[2:2 + S], work[2 + S:]
                st.last_revived = torch.where(new_revived, state.step, st.last_revived)
                need = new_revived & ~st.cached
                if m:
                    evicted = self._evict(st, need, new_revived)
                    st.cached &= ~evicted
            for i, stage in enumerate(state.stages):
                s = stage.store
                new = None
                if m:  # evicted tokens leave every head
                    ranks = self._head_ranks(state, s)
                    gone = (ranks >= 0) & evicted.gather(1, ranks.clamp(min=0))
                    s.order[:, :s.head] = torch.where(gone, NEVER, s.order[:, :s.head])
                    s.valid[:, :s.head] &= ~gone
                    if i >= start and sizes[i] > 0:
                        new = (need & st.dropped_by[i]).sum(-1)  # tokens this stage gets computed, per row
                        if sizes[i] > s.head:
                            grown = -(-sizes[i] // CACHE_CHUNK) * CACHE_CHUNK
                            s.grow_head(min(grown, max(sizes[i], st.cache_bound)) - s.head)
                present = new_revived & st.dropped_by[i] & (st.cached if st.cached is not None else True)
                self._arrange(state, s, rows, present, new, widths[i] if new is not None else 0, reads[i])
            if m:
                self._compute_missing(engine, state, need, m, start, widths)
                st.cached |= need
            for stage in state.stages:  # a head slot is read iff its token is revived
                s = stage.store
                ranks = self._head_ranks(state, s)
                on = (ranks >= 0) & new_revived.gather(1, ranks.clamp(min=0))
                s.valid[:, :s.head] = torch.where(rows[:, None], on, s.valid[:, :s.head])
        for stage, base, slot_rank in zip(state.stages, st.base_valid, st.slot_rank):
            s, H, Tk = stage.store, stage.store.head, stage.Tk
            if cfg.variant == "hard":  # replace: kept tokens outside T_l leave for the window
                base = base & (target.gather(1, slot_rank.clamp(min=0)) | (slot_rank < 0))
                s.dense = False  # the kept slots now have holes: attention needs its mask from here on
            s.valid[:, H:H + Tk] = torch.where(rows[:, None], base, s.valid[:, H:H + Tk])

    def _arrange(self, state, s, rows, present, new, m: int, n: int):
        """For `rows`: move the tokens in `present` [B, Nmax] (held in s's head) next to the head's last slots,
        and leave the last `new` [B] slots free for the tokens about to be computed there (None: none; m: the
        most in a row). Only tokens that must move are swapped: `n` bounds the swaps per row."""
        H = s.head
        if H == 0 or n == 0:
            return
        ranks = self._head_ranks(state, s)
        wanted = (ranks >= 0) & present.gather(1, ranks.clamp(min=0))
        room = new[:, None] if new is not None else 0
        j = torch.arange(H, device=ranks.device)[None]
        window = (j >= H - room - wanted.sum(-1, keepdim=True)) & (j < H - room)
        self._swap(s, rows, window & ~wanted, ~window & wanted, n)
        if new is not None:  # tokens in the slots to compute into that stay in the head move out to free slots
            tail = j >= H - room
            held = self._head_ranks(state, s) >= 0
            self._swap(s, rows, tail & held, ~(tail | window) & ~held, m)

    def _swap(self, s, rows, a, b, n: int):
        """Exchange, in rows `rows`, the head slots in `a` [B, H] with those in `b` (equal counts per row, at most
        n) in every layer's K/V and in the tags. Rows with fewer repeat their first pair (same values written
        twice), or slot 0 with itself."""
        ia, va = first_true(a & rows[:, None], n)
        ib, vb = first_true(b & rows[:, None], n)
        ok = va & vb
        some = ok[:, :1]
        ia = torch.where(ok, ia, torch.where(some, ia[:, :1], 0))
        ib = torch.where(ok, ib, torch.where(some, ib[:, :1], 0))
        dst, src = torch.cat([ia, ib], 1), torch.cat([ib, ia], 1)
        for t in (*s.k, *s.v):
            e_src = src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
            t.scatter_(2, dst[:, None, :, None].expand_as(e_src), t.gather(2, e_src))
        s.order.scatter_(1, dst, s.order.gather(1, src))
        s.valid.scatter_(1, dst, s.valid.gather(1, src))

    @staticmethod
    def _evict(st, need, wanted) -> torch.Tensor:
        """[B, Nmax] the cached tokens to drop so that the ones `need` adds fit the bound: the least recently
        revived first, never one `wanted` now."""
        excess = (st.cached.sum(-1) + need.sum(-1) - st.cache_bound).clamp(min=0)
        candidate = st.cached & ~wanted
        age = torch.where(candidate, st.last_revived, torch.iinfo(torch.long).max)
        by_age = torch.argsort(age, dim=-1, stable=True)
        place = torch.empty_like(by_age).scatter_(1, by_age, torch.arange(age.shape[1], device=age.device)
                                                  .expand_as(by_age))
        return candidate & (place < excess[:, None])

    def _compute_missing(self, engine, state, need, m: int, start: int, widths: list):
        """`recompute` source: K/V at layers >= P of the `need` visual tokens (at most m per row), computed in
        place in the head's last slots of every stage from `start` on (left free by `_arrange`). A token starts
        from its hidden state at the prune point of the first stage that dropped it and runs that stage's layers
        and every later one; in each stage it attends causally to the text prefix and the visual tokens that
        stage kept (not to other revived tokens), so its K/V equal those of a prefill that had also kept that one
        token, and stay valid for the rest of the sequence, whichever window revives it again.
        The m queries of a row are its tokens right-aligned, the latest-dropped first: at every stage the ones
        it computes (dropped there or before) are the last ones, so query j writes head slot H - m + j and a row's
        tokens fill exactly its last slots; the other queries write nothing. Stage i runs only the last
        `widths[i]` queries: the others join at a later stage, from their own hidden states."""
        st, S, N = state.shift_state, len(state.stages), need.shape[1]
        ranks = torch.arange(N, device=need.device).expand_as(need)
        key = torch.where(need, (S - state.dropped_at) * (N + 1) + ranks, -1)
        order_key = torch.sort(key, dim=-1, stable=True)
        rank, nvalid = order_key.indices[:, N - m:], order_key.values[:, N - m:] >= 0
        pos = state.visual_pos.gather(1, rank)
        first = state.dropped_at.gather(1, rank)  # the stage each token starts in
        hid = state.hidden_at_P
        D, hd = hid.shape[-1], state.cos.shape[-1]
        h_drop = hid.gather(1, state.hidden_index.gather(1, rank).clamp(min=0)[..., None].expand(-1, -1, D))
        cos = state.cos.gather(1, pos[..., None].expand(-1, -1, hd))
        sin = state.sin.gather(1, pos[..., None].expand(-1, -1, hd))
        h = h_drop
        pad = PAD_QUERY - torch.arange(m, device=pos.device).expand_as(pos)
        for i in range(start, S):
            stage, base = state.stages[i], st.base_valid[i]
            s, H, Tk, w = stage.store, stage.store.head, stage.Tk, widths[i]
            h = torch.where((first == i)[..., None], h_drop, h)  # tokens this stage dropped join here
            if w == 0:
                continue
            q = slice(m - w, m)
            live = (nvalid & (first <= i))[:, q]
            order = torch.where(live, pos[:, q], pad[:, q])
            s.order[:, H - w:H] = torch.where(live, pos[:, q], s.order[:, H - w:H])
            kept_valid = s.valid[:, H:H + Tk].clone()
            s.valid[:, H:H + Tk] = base
            head_len = s.head_len
            s.head_len = H  # the whole head is read, and masked: every query sees the kept set and itself
            in_head = torch.arange(s.used, device=pos.device) < H
            mask = s.mask(order) & (~in_head | (s.order[:, None, None, :s.used] == order[:, None, :, None]))
            mask |= ~live[:, None, :, None]  # a query that computes nothing may see anything (no empty row)
            out, _ = engine.run_layers(stage.layers, h[:, q], s, H - w, order, cos[:, q], sin[:, q],
                                       torch.where(live, pos[:, q], -1), state.prepared.extras, rows=live, mask=mask)
            h = torch.cat([h[:, :m - w], out], 1)
            s.valid[:, H:H + Tk], s.head_len = kept_valid, head_len
            st.extra_flops += engine.flops(len(stage.layers), live.sum(), (mask[:, 0] & live[:, :, None]).sum())

    @staticmethod
    def _active_count(state) -> torch.Tensor:
        """Visual tokens active at the last stage's layers, per row: kept slots still valid + revived slots."""
        st, stage = state.shift_state, state.stages[-1]
        s, H, Tk = stage.store, stage.store.head, stage.Tk
        kept_slots = ((st.slot_rank[-1] >= 0) & s.valid[:, H:H + Tk]).sum(-1)
        return kept_slots + s.valid[:, :H].sum(-1)

    def finish(self, trace, state):
        st = state.shift_state
        trace.decode_flops += st.extra_flops
        trace.detect_seconds, trace.revive_seconds = st.detect_seconds, st.revive_seconds
        for step, (shift, revived) in zip(trace.steps, st.history):
            rows = range(shift.shape[0])
            step.revived = [torch.nonzero(revived[b]).flatten().tolist() if revived is not None and bool(shift[b])
                            else [] for b in rows]
