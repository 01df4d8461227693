"""DSTP: decoding-stage shift-aware token pruning (DESIGN §5).

Per sequence: the prefill kept set S0, the reserve R (every other visual token) and an anchor a0, the last
prompt token's head-mean attention over S0 at the probe layer p. At each decoding step:
  RISD  a_l = the new token's attention over S0 at p (softmax over S0); shift when cos(a_l, a0) < tau.
  CPTS  on a shift, attention over R (its own softmax) joins a_l; the top-k over S0 u R is T_l and the
        active set becomes S0 u T_l for `window` steps, this one included; then back to S0.
Revived tokens get K/V at layers >= P from their hidden states at P (`recompute`) or from a full-prefill
copy (`store`), written into the revival slots of the pruned KV store. Every row shifts independently.

Multi-stage pruners: S0 is the final stage's set, R every other visual token. A revived token gets K/V and a
revival slot in every stage from the first one that dropped it (`recompute`: from its hidden state at that
stage's prune point, through that stage's layers and every later one, attending at each stage to the text and
the visual tokens that stage kept).

Host synchronisation: one per decoding step. CPTS's candidate set is computed for every row at every step (one
query row over the reserve and a top-k, on the device), so a single read brings back everything the host needs
to decide: whether any row shifted or closed its window, each stage's revival-tail length, and (`recompute`) how
many tokens to compute and how large the cache must be.

`recompute` cache: the K/V of revived tokens computed so far, in slots that grow by `CACHE_CHUNK` tokens up to
`DSTPConfig.cache_tokens` per sequence (default: the reserve, so nothing is ever evicted). When a shift needs
tokens and the cache is full, the tokens least recently revived that the shift does not revive are evicted; an
evicted token is recomputed if it is revived again (same K/V: its inputs do not change).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dstp.config import DSTPConfig
from dstp.engine.prune_context import topk_mask
from dstp.engine.trace import StepTrace
from dstp.errors import ConfigError

CACHE_CHUNK = 64  # recompute cache: token slots added per growth step


def _extend(t: torch.Tensor, axis: int, extra: int, fill) -> torch.Tensor:
    """t with `extra` slots filled with `fill` appended along `axis` (one reallocation)."""
    shape = list(t.shape)
    shape[axis] = extra
    return torch.cat([t, t.new_full(shape, fill)], axis)


@dataclass
class ShiftState:
    probe: int
    keys: torch.Tensor  # [B, H, Nmax, hd] probe-layer keys of every visual token (kv heads repeated, scaled)
    s0_rank: torch.Tensor  # [B, Kmax] visual ranks of S0 (padded with 0)
    s0_valid: torch.Tensor  # [B, Kmax]
    s0_keys: torch.Tensor  # [B, H, Kmax, hd] the keys detection attends to
    anchor: torch.Tensor  # [B, Nmax] a0, zero outside S0
    k: torch.Tensor  # [B] budget
    remaining: torch.Tensor  # [B] window steps left (0: inactive)
    in_window: torch.Tensor  # [B] bool: the active set differs from S0
    revived: torch.Tensor  # [B, Nmax] bool: tokens currently in the revival slots
    base_valid: list  # per stage, [B, Tk] validity of its kept prompt slots at prefill
    slot_rank: list  # per stage, [B, Tk] visual rank held by each kept slot (-1: text or padding)
    generator: torch.Generator
    history: list
    # recompute: K/V of revived tokens computed so far, [L-P, B, Hkv, C, hd] (layer P + i at index i; a token's
    # entries are filled from the first stage that dropped it); C slots, grown by CACHE_CHUNK up to cache_bound
    cache_k: torch.Tensor | None = None
    cache_v: torch.Tensor | None = None
    cache_slot: torch.Tensor | None = None  # [B, Nmax + 1] slot of each visual rank (-1: not cached; last: scratch)
    cache_token: torch.Tensor | None = None  # [B, C] visual rank held by each slot (-1: free)
    last_revived: torch.Tensor | None = None  # [B, Nmax] step at which each token was last revived (LRU)
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
        hd = state.cos.shape[-1]
        idx_hd = vpos[..., None].expand(-1, -1, hd)
        hid = probe_hidden  # [B, T, D] input of the probe layer (P = 0: the embeddings the first stage kept)
        if state.P == 0:
            hv = hid.gather(1, vpos[..., None].expand(-1, -1, hid.shape[-1]))
            keys = a.key(0, hv, state.cos.gather(1, idx_hd), state.sin.gather(1, idx_hd))
        else:
            store = state.full
            keys = store.k[store.local(p)].gather(2, vpos[:, None, :, None].expand(-1, a.n_kv_heads, -1, a.head_dim))
        keys = keys.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1).float() * a.attention_scale(p)
        q_last = a.query(p, hid[:, -1:], state.cos[:, -1:], state.sin[:, -1:])
        anchor = self._attend(q_last, keys, state.kept)
        kcount = state.kept.sum(-1)
        s0_rank = torch.argsort((~state.kept).to(torch.int8), dim=-1, stable=True)[:, : int(kcount.max())]
        s0_valid = torch.arange(s0_rank.shape[1], device=vpos.device)[None] < kcount[:, None]
        s0_keys = keys.gather(2, s0_rank[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
        # which visual rank each kept slot of each stage holds
        rank_of_pos = torch.full((B, state.T), -1, dtype=torch.long, device=vpos.device)
        rank_of_pos.scatter_(1, vpos, torch.arange(N, device=vpos.device).expand(B, N).masked_fill(~state.visual_valid, -1))
        base_valid, slot_rank = [], []
        for stage in state.stages:
            order = stage.store.order[:, :stage.Tk]
            base_valid.append(stage.store.valid[:, :stage.Tk].clone())
            slot_rank.append(torch.where(order >= 0, rank_of_pos.gather(1, order.clamp(min=0)), -1))
        return ShiftState(
            probe=p, keys=keys, s0_rank=s0_rank, s0_valid=s0_valid, s0_keys=s0_keys, anchor=anchor, k=kcount,
            remaining=torch.zeros(B, dtype=torch.long, device=vpos.device),
            in_window=torch.zeros(B, dtype=torch.bool, device=vpos.device),
            revived=torch.zeros(B, N, dtype=torch.bool, device=vpos.device),
            base_valid=base_valid, slot_rank=slot_rank,
            generator=torch.Generator(device=vpos.device).manual_seed(self.config.seed), history=[],
            **self._revived_cache(state))

    def _revived_cache(self, state) -> dict:
        """An empty recompute cache (no slots yet) and its bound: `cache_tokens`, or the largest reserve."""
        if self.config.source != "recompute" or state.R == 0:
            return {}
        s, (B, N) = state.pruned, state.visual_pos.shape
        reserve = int((state.visual_valid & ~state.kept).sum(-1).max())
        bound = reserve if self.config.cache_tokens is None else min(self.config.cache_tokens, reserve)
        if bound < state.R:
            raise ConfigError(f"DSTP cache_tokens={self.config.cache_tokens} is below the {state.R} revival slots per "
                              f"sequence: one shift's revived tokens must fit (raise cache_tokens or lower max_revived)")
        shape = (s.layers.stop - state.P, B, s.k.shape[2], 0, s.k.shape[-1])
        dev = s.k.device
        return dict(cache_k=s.k.new_zeros(shape), cache_v=s.v.new_zeros(shape), cache_bound=bound,
                    cache_slot=torch.full((B, N + 1), -1, dtype=torch.long, device=dev),
                    cache_token=torch.full((B, 0), -1, dtype=torch.long, device=dev),
                    last_revived=torch.full((B, N), -1, dtype=torch.long, device=dev))

    @staticmethod
    def _attend(q: torch.Tensor, keys: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
        """Head-mean softmax attention [B, N] of one query row q [B, H, 1, hd] over the keys in `over`."""
        scores = (q.float() @ keys.transpose(-1, -2))[:, :, 0]  # [B, H, N]
        probs = torch.softmax(scores.masked_fill(~over[:, None, :], float("-inf")), dim=-1)
        return probs.nan_to_num(0.0).mean(1)

    # -- each decoding step ---------------------------------------------------------------------
    def step(self, engine, state, q_probe) -> StepTrace:
        cfg, st = self.config, state.shift_state
        t0 = time.perf_counter()
        kept, valid = state.kept, state.visual_valid
        # detection: one query row against the k keys of S0 per head
        a_s0 = self._attend(q_probe, st.s0_keys, st.s0_valid)
        a_l = torch.zeros_like(st.anchor).scatter(1, st.s0_rank, a_s0.masked_fill(~st.s0_valid, 0.0))
        sim = torch.nn.functional.cosine_similarity(a_l, st.anchor, dim=-1)
        shift = torch.ones_like(sim, dtype=torch.bool) if cfg.variant == "every_step" else sim < cfg.tau
        if cfg.force_every is not None and state.step % cfg.force_every == 0:
            shift = torch.ones_like(shift)
        expired = (st.remaining == 0) & st.in_window & ~shift
        # CPTS for every row, whether or not one shifted: then one read tells the host all it must know
        a_r = self._attend(q_probe, st.keys, valid & ~kept)
        target = self._target(torch.where(kept, a_l, a_r), valid, st)
        revive = target & ~kept & shift[:, None]
        rank, rvalid = self._pack(revive, state.R)  # at most R revived per row, in rank order
        new_revived = torch.zeros_like(revive).scatter(1, rank, rvalid) & revive
        t1 = time.perf_counter()
        st.detect_seconds += t1 - t0

        plan = self._plan(state, shift, expired, new_revived).tolist()  # the step's one host synchronisation
        S = len(state.stages)
        any_shift, any_expired, tails, work = plan[0], plan[1], plan[2:2 + S], plan[2 + S:]
        if any_expired:
            self._deactivate(state, expired)
        if any_shift:
            self._activate(engine, state, shift, target, new_revived, work)
            st.remaining = torch.where(shift, torch.full_like(st.remaining, cfg.window), st.remaining)
            st.in_window |= shift
        for stage, n in zip(state.stages, tails):
            stage.store.tail_len = n
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
        """What the host needs from this step, as one int tensor: [any row shifts, any window closes, each stage's
        revival-tail length after the step, then (recompute) tokens to compute (max over rows), cache slots needed
        (max over rows), the first stage they start in]."""
        st = state.shift_state
        tails = []
        for stage in state.stages:
            now = stage.store.valid[:, stage.rev0:].sum(-1)
            after = (new_revived & ~stage.kept).sum(-1)
            tails.append(torch.where(shift, after, torch.where(expired, 0, now)).max())
        parts = [shift.any(), expired.any(), *tails]
        if st.cache_k is not None:
            cached = st.cache_slot[:, :-1] >= 0
            need = new_revived & ~cached
            count = need.sum(-1)
            first = torch.where(need, state.dropped_at, len(state.stages)).min()
            parts += [count.max(), (cached.sum(-1) + count).max(), first]
        return torch.stack([torch.as_tensor(p, device=shift.device).long() for p in parts])

    def _deactivate(self, state, rows):
        st = state.shift_state
        for stage, base in zip(state.stages, st.base_valid):
            s, r0 = stage.store, stage.rev0
            s.valid[:, r0:] &= ~rows[:, None]
            s.valid[:, :stage.Tk] = torch.where(rows[:, None], base, s.valid[:, :stage.Tk])
        st.revived &= ~rows[:, None]
        st.in_window &= ~rows

    @staticmethod
    def _pack(mask: torch.Tensor, n: int):
        """The first n True entries of each row of mask [B, N], in rank order: (rank [B, n], valid [B, n])."""
        rank = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :n]
        return rank, torch.arange(rank.shape[1], device=mask.device)[None] < mask.sum(-1, keepdim=True)

    def _activate(self, engine, state, rows, target, new_revived, work):
        """Open windows for `rows`: revive `new_revived` into every stage's tail (its length is set by the caller);
        `work`: the recompute part of the step's plan."""
        st, R, cfg = state.shift_state, state.R, self.config
        if R > 0:
            st.revived = torch.where(rows[:, None], new_revived, st.revived)
            for stage in state.stages:
                stage.store.tail_len = R  # the whole tail while revived K/V are produced
            if cfg.source == "recompute":
                self._compute_missing(engine, state, new_revived, *work)
            for stage in state.stages:
                # this stage's revival slots: the revived tokens it does not hold, each row's in its first slots
                s, r0 = stage.store, stage.rev0
                rank, rvalid = self._pack(new_revived & ~stage.kept, R)
                pos = state.visual_pos.gather(1, rank)
                if cfg.source == "store":
                    self._fill_tail(state, stage, rows, state.reserve.k, state.reserve.v, pos)
                elif st.cache_token.shape[1]:  # an empty cache: nothing was ever revived, nothing to copy
                    slot = st.cache_slot.gather(1, rank).clamp(min=0)
                    self._fill_tail(state, stage, rows, st.cache_k, st.cache_v, slot)
                pad_tag = -1 - torch.arange(r0, r0 + R, device=pos.device).expand_as(pos)
                s.order[:, r0:] = torch.where(rows[:, None], torch.where(rvalid, pos, pad_tag), s.order[:, r0:])
                s.valid[:, r0:] = torch.where(rows[:, None], rvalid, s.valid[:, r0:])
        for stage, base, slot_rank in zip(state.stages, st.base_valid, st.slot_rank):
            s, Tk = stage.store, stage.Tk
            if cfg.variant == "hard":  # replace: kept tokens outside T_l leave for the window
                base = base & (target.gather(1, slot_rank.clamp(min=0)) | (slot_rank < 0))
                s.dense = False  # the kept slots now have holes: attention needs its mask from here on
            s.valid[:, :Tk] = torch.where(rows[:, None], base, s.valid[:, :Tk])

    @staticmethod
    def _fill_tail(state, stage, rows, src_k, src_v, index):
        """Revival slots of `stage` for `rows` <- K/V of `src` (layer P + i at index i) at `index` [B, R] of its
        token axis, every layer of the stage."""
        s, r0 = stage.store, stage.rev0
        idx = index[:, None, :, None].expand(-1, s.k.shape[2], -1, s.k.shape[-1])
        keep = rows[:, None, None, None]
        for li, layer in enumerate(stage.layers):
            g = layer - state.P
            s.k[li, :, :, r0:] = torch.where(keep, src_k[g].gather(2, idx), s.k[li, :, :, r0:])
            s.v[li, :, :, r0:] = torch.where(keep, src_v[g].gather(2, idx), s.v[li, :, :, r0:])

    def _compute_missing(self, engine, state, wanted, m: int, slots_needed: int, start: int):
        """`recompute` source: K/V at layers >= P of the wanted visual tokens not in the cache (at most m per row;
        the cache grown to `slots_needed` slots within its bound, LRU eviction beyond it). A token starts from its
        hidden state at the prune point of the first stage that dropped it and runs that stage's layers and every
        later one; in each stage it attends
        causally to the text prefix and the visual tokens that stage kept (not to other revived tokens), so its
        K/V equal those of a prefill that had also kept that one token, and stay valid for the rest of the
        sequence, whichever window revives it again."""
        st = state.shift_state
        st.last_revived = torch.where(wanted, state.step, st.last_revived)
        if m == 0:
            return
        self._grow_cache(st, slots_needed)
        need = wanted & ~(st.cache_slot[:, :-1] >= 0)
        rank, nvalid = self._pack(need, m)
        slots = self._free_slots(st, wanted, m)  # [B, m]: where each row's j-th needed token goes
        rows = nvalid.any(-1)
        pos = state.visual_pos.gather(1, rank)
        first = state.dropped_at.gather(1, rank)  # the stage each token starts in
        hid = state.hidden_at_P
        D, hd = hid.shape[-1], state.cos.shape[-1]
        h_drop = hid.gather(1, pos[..., None].expand(-1, -1, D))
        cos = state.cos.gather(1, pos[..., None].expand(-1, -1, hd))
        sin = state.sin.gather(1, pos[..., None].expand(-1, -1, hd))
        h = h_drop
        idx = slots[:, None, :, None].expand(-1, st.cache_k.shape[2], -1, st.cache_k.shape[-1])
        for i in range(start, len(state.stages)):
            stage, base = state.stages[i], st.base_valid[i]
            s, r0, Tk = stage.store, stage.rev0, stage.Tk
            h = torch.where((first == i)[..., None], h_drop, h)  # tokens this stage dropped join here
            live = nvalid & (first <= i)
            order = torch.where(live, pos, -1 - torch.arange(r0, r0 + m, device=pos.device).expand_as(pos))
            # the revival slots of the rows computing serve as scratch; every query sees only the kept set and itself
            s.order[:, r0:r0 + m] = torch.where(rows[:, None], order, s.order[:, r0:r0 + m])
            kept_valid = s.valid[:, :Tk].clone()
            s.valid[:, :Tk] = base
            mask = s.mask(order)
            tail = torch.arange(s.capacity, device=pos.device)[: mask.shape[-1]] >= r0
            mask &= ~tail | (s.order[:, None, None, : mask.shape[-1]] == order[:, None, :, None])
            h, _ = engine.run_layers(stage.layers, h, s, r0, order, cos, sin, torch.where(live, pos, -1),
                                     state.prepared.extras, rows=rows, mask=mask)
            s.valid[:, :Tk] = kept_valid
            st.extra_flops += engine.flops(len(stage.layers), live.sum(), (mask[:, 0] & live[:, :, None]).sum())
            put = live[:, None, :, None]
            for li, layer in enumerate(stage.layers):
                g = layer - state.P
                for cache, fresh in ((st.cache_k, s.k), (st.cache_v, s.v)):
                    old = cache[g].gather(2, idx)
                    cache[g].scatter_(2, idx, torch.where(put, fresh[li, :, :, r0:r0 + m], old))
        # the slot maps: evicted tokens leave (their writes go to the scratch column when nothing is evicted), the
        # computed ones arrive; the slots of a row are distinct, so no two writes of one scatter meet
        N = need.shape[1]
        evicted = st.cache_token.gather(1, slots)
        st.cache_slot.scatter_(1, torch.where(nvalid & (evicted >= 0), evicted, N), -1)
        st.cache_slot.scatter_(1, torch.where(nvalid, rank, N), torch.where(nvalid, slots, -1))
        st.cache_token.scatter_(1, slots, torch.where(nvalid, rank, evicted))

    @staticmethod
    def _grow_cache(st, slots: int):
        """Room for `slots` tokens per row: whole chunks, within the bound."""
        C = st.cache_token.shape[1]
        if slots <= C:
            return
        new = min(st.cache_bound, -(-slots // CACHE_CHUNK) * CACHE_CHUNK)
        st.cache_k, st.cache_v = _extend(st.cache_k, 3, new - C, 0), _extend(st.cache_v, 3, new - C, 0)
        st.cache_token = _extend(st.cache_token, 1, new - C, -1)

    @staticmethod
    def _free_slots(st, wanted, m: int) -> torch.Tensor:
        """[B, m] cache slots for each row's tokens to compute: free slots first, then those of the tokens least
        recently revived, never one whose token this shift revives."""
        held = st.cache_token >= 0
        tok = st.cache_token.clamp(min=0)
        age = torch.where(held, st.last_revived.gather(1, tok), -1)  # free slots: -1, first
        age = age.masked_fill(held & wanted.gather(1, tok), torch.iinfo(torch.long).max)
        return torch.argsort(age, dim=-1, stable=True)[:, :m]

    @staticmethod
    def _active_count(state) -> torch.Tensor:
        """Visual tokens active at the last stage's layers, per row: kept slots still valid + revived slots."""
        st, stage = state.shift_state, state.stages[-1]
        s, Tk, r0 = stage.store, stage.Tk, stage.rev0
        kept_slots = ((st.slot_rank[-1] >= 0) & s.valid[:, :Tk]).sum(-1)
        return kept_slots + s.valid[:, r0:].sum(-1)

    def finish(self, trace, state):
        st = state.shift_state
        trace.decode_flops += st.extra_flops
        trace.detect_seconds, trace.revive_seconds = st.detect_seconds, st.revive_seconds
        for step, (shift, revived) in zip(trace.steps, st.history):
            rows = range(shift.shape[0])
            step.revived = [torch.nonzero(revived[b]).flatten().tolist() if revived is not None and bool(shift[b])
                            else [] for b in rows]
