"""DSTP: decoding-stage shift-aware token pruning (DESIGN §5).

Per sequence: the prefill kept set S0, the reserve R (every other visual token) and an anchor a0, the last
prompt token's head-mean attention over S0 at the probe layer p. At each decoding step:
  RISD  a_l = the new token's attention over S0 at p (softmax over S0); shift when cos(a_l, a0) < tau.
  CPTS  on a shift, attention over R (its own softmax) joins a_l; the top-k over S0 u R is T_l and the
        active set becomes S0 u T_l for `window` steps, this one included; then back to S0.
Revived tokens get K/V at layers >= P from their hidden states at P (`recompute`) or from a full-prefill
copy (`store`), written into the revival slots of the pruned KV store. Every row shifts independently.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dstp.config import DSTPConfig
from dstp.engine.prune_context import topk_mask
from dstp.engine.trace import StepTrace
from dstp.errors import ConfigError


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
    base_valid: torch.Tensor  # [B, Tk] validity of the kept prompt slots at prefill
    slot_rank: torch.Tensor  # [B, Tk] visual rank held by each kept slot (-1: text or padding)
    generator: torch.Generator
    history: list
    cache_k: torch.Tensor | None = None  # recompute: [L-P, B, Hkv, Nmax, hd] K/V of visual tokens computed so far
    cache_v: torch.Tensor | None = None
    computed: torch.Tensor | None = None  # [B, Nmax] bool  # per step: (similarity, shift, active, revived mask)
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
        if state.P == 0:
            hid = state.hidden_at_P
            hv = hid.gather(1, vpos[..., None].expand(-1, -1, hid.shape[-1]))
            keys = a.key(0, hv, state.cos.gather(1, idx_hd), state.sin.gather(1, idx_hd))
        else:
            hid = probe_hidden
            store = state.full
            keys = store.k[store.local(p)].gather(2, vpos[:, None, :, None].expand(-1, a.n_kv_heads, -1, a.head_dim))
        keys = keys.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1).float() * a.attention_scale(p)
        q_last = a.query(p, hid[:, -1:], state.cos[:, -1:], state.sin[:, -1:])
        anchor = self._attend(q_last, keys, state.kept)
        kcount = state.kept.sum(-1)
        s0_rank = torch.argsort((~state.kept).to(torch.int8), dim=-1, stable=True)[:, : int(kcount.max())]
        s0_valid = torch.arange(s0_rank.shape[1], device=vpos.device)[None] < kcount[:, None]
        s0_keys = keys.gather(2, s0_rank[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1]))
        Tk = state.Tk
        base_valid = state.pruned.valid[:, :Tk].clone()
        order = state.pruned.order[:, :Tk]
        # which visual rank each kept slot holds
        rank_of_pos = torch.full((B, state.T), -1, dtype=torch.long, device=vpos.device)
        rank_of_pos.scatter_(1, vpos, torch.arange(N, device=vpos.device).expand(B, N).masked_fill(~state.visual_valid, -1))
        slot_rank = torch.where(order >= 0, rank_of_pos.gather(1, order.clamp(min=0)), -1)
        return ShiftState(
            probe=p, keys=keys, s0_rank=s0_rank, s0_valid=s0_valid, s0_keys=s0_keys, anchor=anchor, k=kcount,
            remaining=torch.zeros(B, dtype=torch.long, device=vpos.device),
            in_window=torch.zeros(B, dtype=torch.bool, device=vpos.device),
            revived=torch.zeros(B, N, dtype=torch.bool, device=vpos.device),
            base_valid=base_valid, slot_rank=slot_rank,
            generator=torch.Generator(device="cpu").manual_seed(self.config.seed), history=[],
            **self._revived_cache(state))

    def _revived_cache(self, state) -> dict:
        if self.config.source != "recompute" or state.R == 0:
            return {}
        s, N = state.pruned, state.visual_pos.shape[1]
        shape = (len(s.layers), s.k.shape[1], s.k.shape[2], N, s.k.shape[-1])
        return dict(cache_k=s.k.new_zeros(shape), cache_v=s.v.new_zeros(shape),
                    computed=torch.zeros(state.kept.shape, dtype=torch.bool, device=s.k.device))

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
        t1 = time.perf_counter()
        st.detect_seconds += t1 - t0

        expired = (st.remaining == 0) & st.in_window & ~shift
        if bool(expired.any()):
            self._deactivate(state, expired)
        any_shift = bool(shift.any())  # host sync: whether to produce revived K/V at all
        if any_shift:
            a_r = self._attend(q_probe, st.keys, valid & ~kept)
            scores = torch.where(kept, a_l, a_r)
            target = self._target(scores, valid, st)
            self._activate(engine, state, shift, target)
            st.remaining = torch.where(shift, torch.full_like(st.remaining, cfg.window), st.remaining)
            st.in_window |= shift
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

    def _deactivate(self, state, rows):
        st, s, Tk, r0 = state.shift_state, state.pruned, state.Tk, state.rev0
        s.valid[:, r0:] &= ~rows[:, None]
        s.valid[:, :Tk] = torch.where(rows[:, None], st.base_valid, s.valid[:, :Tk])
        st.revived &= ~rows[:, None]
        st.in_window &= ~rows
        s.tail_len = int(s.valid[:, r0:].sum(-1).max())

    def _activate(self, engine, state, rows, target):
        st, s, Tk, R, r0, cfg = state.shift_state, state.pruned, state.Tk, state.R, state.rev0, self.config
        kept = state.kept
        revive = target & ~kept & rows[:, None]
        if R > 0:
            s.tail_len = R  # the whole tail while revived K/V are produced
            # revived ranks, best first, at most R of them, then in rank order
            score = revive.float() * 2 - torch.arange(revive.shape[1], device=revive.device) * 1e-6
            rank = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :R]
            rvalid = revive.gather(1, rank)
            rank = torch.sort(torch.where(rvalid, rank, rank.new_full((), 1 << 40)), dim=-1).values
            rvalid = rank < (1 << 40)
            rank = rank.clamp(max=revive.shape[1] - 1)
            new_revived = torch.zeros_like(revive).scatter(1, rank, rvalid)
            st.revived = torch.where(rows[:, None], new_revived, st.revived)
            pos = state.visual_pos.gather(1, rank)
            if cfg.source == "store":
                self._fill_tail(state, rows, state.reserve.k, state.reserve.v, pos)
            else:
                self._compute_missing(engine, state, new_revived)
                self._fill_tail(state, rows, st.cache_k, st.cache_v, rank)
            pad_tag = -1 - torch.arange(r0, r0 + R, device=pos.device).expand_as(pos)
            s.order[:, r0:] = torch.where(rows[:, None], torch.where(rvalid, pos, pad_tag), s.order[:, r0:])
            s.valid[:, r0:] = torch.where(rows[:, None], rvalid, s.valid[:, r0:])
            s.tail_len = int(s.valid[:, r0:].sum(-1).max())  # each row's revived tokens fill its first slots
        if cfg.variant == "hard":  # replace: S0 tokens outside T_l leave for the window
            in_target = target.gather(1, st.slot_rank.clamp(min=0)) | (st.slot_rank < 0)
            s.valid[:, :Tk] = torch.where(rows[:, None], st.base_valid & in_target, s.valid[:, :Tk])
        else:
            s.valid[:, :Tk] = torch.where(rows[:, None], st.base_valid, s.valid[:, :Tk])

    @staticmethod
    def _fill_tail(state, rows, src_k, src_v, index):
        """Revival slots of `rows` <- K/V of `src` at `index` [B, R] (its token axis), every layer >= P."""
        s, r0 = state.pruned, state.rev0
        idx = index[:, None, :, None].expand(-1, s.k.shape[2], -1, s.k.shape[-1])
        keep = rows[:, None, None, None]
        for li in range(len(s.layers)):
            s.k[li, :, :, r0:] = torch.where(keep, src_k[li].gather(2, idx), s.k[li, :, :, r0:])
            s.v[li, :, :, r0:] = torch.where(keep, src_v[li].gather(2, idx), s.v[li, :, :, r0:])

    def _compute_missing(self, engine, state, wanted):
        """`recompute` source: K/V at layers P..L-1 of the wanted visual tokens not computed yet, into the
        per-sequence cache (bounded by N tokens). Each token attends causally to the text prefix and S0 before
        it (not to other revived tokens), so its K/V equal those of a prefill that had also kept that one token
        and stay valid for the rest of the sequence, whichever window revives it again."""
        st, s, r0, Tk = state.shift_state, state.pruned, state.rev0, state.Tk
        need = wanted & ~st.computed
        count = need.sum(-1)
        if not bool(need.any()):
            return
        m = int(count.max())
        rank = torch.argsort((~need).to(torch.int8), dim=-1, stable=True)[:, :m]
        nvalid = torch.arange(m, device=rank.device)[None] < count[:, None]
        rows = count > 0
        pos = state.visual_pos.gather(1, rank)
        order = torch.where(nvalid, pos, -1 - torch.arange(r0, r0 + m, device=pos.device).expand_as(pos))
        # the revival slots of the rows computing serve as scratch; every query sees only S0 and itself
        s.order[:, r0:r0 + m] = torch.where(rows[:, None], order, s.order[:, r0:r0 + m])
        kept_valid = s.valid[:, :Tk].clone()
        s.valid[:, :Tk] = st.base_valid
        mask = s.mask(order)
        tail = torch.arange(s.capacity, device=pos.device) >= r0
        mask &= ~tail | (s.order[:, None, None, :] == order[:, None, :, None])
        hid = state.hidden_at_P
        D, hd = hid.shape[-1], state.cos.shape[-1]
        h = hid.gather(1, pos[..., None].expand(-1, -1, D))
        cos = state.cos.gather(1, pos[..., None].expand(-1, -1, hd))
        sin = state.sin.gather(1, pos[..., None].expand(-1, -1, hd))
        L = engine.adapter.n_layers
        engine.run_layers(range(state.P, L), h, s, r0, order, cos, sin, torch.where(nvalid, pos, -1),
                           state.prepared.extras, rows=rows, mask=mask)
        s.valid[:, :Tk] = kept_valid
        st.extra_flops += engine.flops(L - state.P, need.sum(), (mask[:, 0] & nvalid[:, :, None]).sum())
        idx = rank[:, None, :, None].expand(-1, s.k.shape[2], -1, s.k.shape[-1])
        put = nvalid[:, None, :, None]
        for li in range(len(s.layers)):
            for cache, fresh in ((st.cache_k, s.k), (st.cache_v, s.v)):
                old = cache[li].gather(2, idx)
                cache[li].scatter_(2, idx, torch.where(put, fresh[li, :, :, r0:r0 + m], old))
        st.computed |= need

    @staticmethod
    def _active_count(state) -> torch.Tensor:
        """Visual tokens active at layers >= P, per row: kept slots still valid + revived slots."""
        st, s, Tk, r0 = state.shift_state, state.pruned, state.Tk, state.rev0
        kept_slots = ((st.slot_rank >= 0) & s.valid[:, :Tk]).sum(-1)
        return kept_slots + s.valid[:, r0:].sum(-1)

    def finish(self, trace, state):
        st = state.shift_state
        trace.decode_flops += st.extra_flops
        trace.detect_seconds, trace.revive_seconds = st.detect_seconds, st.revive_seconds
        for step, (shift, revived) in zip(trace.steps, st.history):
            rows = range(shift.shape[0])
            step.revived = [torch.nonzero(revived[b]).flatten().tolist() if revived is not None and bool(shift[b])
                            else [] for b in rows]
