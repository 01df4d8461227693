"""DSTP: decoding-stage shift-aware token pruning (docs/design.md §5).

Per sequence: the prefill kept set S0, the reserve R (every other visual token) and an anchor a0, the last
prompt token's head-mean attention over S0 at the probe layer p. At each decoding step:
  RISD  a_l = the new token's attention over S0 at p (softmax over S0); shift when cos(a_l, a0) < tau.
  CPTS  on a shift, attention over R (its own softmax) joins a_l; the top-k over S0 u R is T_l and the
        active set becomes S0 u T_l for `window` steps, this one included; then back to S0.
Revived tokens get K/V at layers >= P from their hidden states at P (`recompute`) or from an unpruned
prefill (`store`). They wait in the reserve of each pruned stage's KV store, [reserve | kept prompt | generated];
attention reads a reserve slot exactly while its token is revived. Every row shifts independently.

DSTP is a client of the KV store: it tags reserve slots with the tokens they hold, says which are read, and (`hard`)
which kept prompt slots are; it writes K/V only through a store's cache view, and holds its own state (`DSTPState`).

The step is tensor work only, with shapes fixed at prefill (one decision per row, computed for every row at every
step): it runs under `torch.compile(fullgraph=True)` and never reads a value back to the host. What that costs:
- `store`: each stage's reserve holds every visual token the stage dropped, with the unpruned prefill's K/V, so the
  KV memory is the unpruned model's (docs/design.md §5); a revival flips the reserve slots' validity, no K/V moves,
  and attention reads the whole reserve, masked (on CPU and in SDPA's kernels a masked key costs as much as a read
  one, so attention at layers >= P costs what the unpruned model's does).
- `recompute`: each stage's reserve holds the revived tokens computed so far, up to `DSTPConfig.cache_tokens` per
  sequence (default: the whole reserve, so nothing is ever evicted). Every step runs R query rows (the most one
  shift may revive) through the pruned layers; rows with nothing to compute write nothing. When a shift needs
  tokens and the bound is reached, the tokens least recently revived that the shift does not revive are evicted; an
  evicted token is recomputed if revived again (same K/V: its inputs do not change).

Multi-stage pruners: S0 is the final stage's set, R every other visual token. A revived token gets K/V in the
reserve of every stage from the first one that dropped it (`recompute`: from its hidden state at that stage's prune
point, through that stage's layers and every later one, attending at each stage to the text and the visual tokens
that stage kept).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.config import DSTPConfig
from dstp.engine.attention import Attention
from dstp.engine.held_bytes import HeldBytes
from dstp.engine.kv_store import NEVER
from dstp.engine.layers import run_layers
from dstp.engine.prune_context import first_true, topk_mask
from dstp.engine.step_compiler import mark_static
from dstp.engine.trace import StepTrace
from dstp.errors import ConfigError

PAD_QUERY = -(1 << 40)  # order tags of recompute queries that compute nothing (each sees only itself)


@dataclass
class DSTPState:
    """What DSTP holds for one generation (the engine's `State` holds none of it). Tensors written in place."""
    adapter: object  # the model family's adapter: probe projections and decoder layers
    linear_params: int  # weights touched once per token per layer (FLOPs)
    probe: int
    R: int  # visual tokens one shift may revive per sequence
    keys: torch.Tensor | None  # P = 0: [B, Hkv, Nmax, hd] layer-0 keys of every visual token
    anchor: torch.Tensor  # [B, Nmax] a0, zero outside S0
    k: torch.Tensor  # [B] budget
    remaining: torch.Tensor  # [B] window steps left (0: inactive)
    in_window: torch.Tensor  # [B] bool: the active set differs from S0
    revived: torch.Tensor  # [B, Nmax] bool: tokens revived by the current window
    hard_keep: torch.Tensor  # [B, Nmax] bool: `hard`: the window's T_l (kept tokens outside it leave)
    base_valid: list  # per stage, [B, Tk] validity of its kept prompt slots at prefill
    slot_rank: list  # per stage, [B, Tk] visual rank held by each kept slot (-1: text or padding)
    reserve_rank: list  # per stage, [B, reserve] visual rank held by each reserve slot (-1: free)
    dropped_by: list  # per stage, [B, Nmax] bool: the visual tokens it does not hold (its reserve)
    generator: torch.Generator
    reserve_kind: str  # what the stores' reserves are, as `Engine.held_bytes` reports them
    # recompute: each reserve token's hidden state at the prune point of the first stage without it, which have
    # K/V in the reserves, and when each was last revived (LRU)
    hidden: torch.Tensor | None = None  # [B, Rmax, D]
    hidden_index: torch.Tensor | None = None  # [B, Nmax] row of `hidden` (-1: not in the reserve)
    cached: torch.Tensor | None = None  # [B, Nmax] bool
    last_revived: torch.Tensor | None = None  # [B, Nmax] step
    cache_bound: int = 0

    def tensors(self) -> list[torch.Tensor]:
        fixed = [self.anchor, self.k, self.remaining, self.in_window, self.revived, self.hard_keep, *self.base_valid,
                 *self.slot_rank, *self.reserve_rank, *self.dropped_by]
        return fixed + [t for t in (self.keys, self.hidden, self.hidden_index, self.cached, self.last_revived)
                        if t is not None]

    def held_bytes(self, held: HeldBytes):
        """What DSTP holds besides the stores' reserves: `hidden_at_P` (recompute's inputs), `dstp_keys` (probe-layer
        keys, kept only for a pruner before the LLM), `dstp` (the rest of its per-sequence state)."""
        held.add("hidden_at_P", [self.hidden, self.hidden_index])
        held.add("dstp_keys", self.keys)
        held.add("dstp", [t for t in self.tensors() if t is not self.keys])


class ShiftPolicy:
    reads_stage_input = False  # its step reads the probe query, not the first pruned stage's input

    def __init__(self, config: DSTPConfig, prune_layer: int):
        self.config, self.P = config, prune_layer

    # -- what the engine asks before and during prefill ---------------------------------------
    def prefill_pruner(self, pruner, n_layers: int):
        """DSTP runs on the base pruner's schedule."""
        return pruner

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
    def fills_reserve(self) -> bool:
        """`store`: the engine fills each stage's reserve from an unpruned prefill."""
        return self.config.source == "store"

    @property
    def reserve_kind(self) -> str:
        return "reserve" if self.config.source == "store" else "dstp_cache"

    def reserve_slots(self, dropped: int) -> int:
        """Reserve slots of a stage that dropped at most `dropped` visual tokens per row (`recompute`: at most the
        cache bound; `setup` widens it to the R queries one step computes, so that each has a slot of its own)."""
        if self.config.source == "store" or self.config.cache_tokens is None:
            return dropped
        return min(self.config.cache_tokens, dropped)

    @staticmethod
    def _revival_slots(config: DSTPConfig, visual_valid, kept) -> int:
        """R: how many visual tokens one shift may revive per sequence."""
        room = int((visual_valid.sum(-1) - kept.sum(-1)).max())
        r = room if config.variant == "all_tokens" else min(int(kept.sum(-1).max()), room)
        if config.max_revived is not None:
            r = min(r, config.max_revived)
        return max(r, 0)

    def setup(self, adapter, state, outputs) -> DSTPState:
        """DSTP's state for one generation, from the engine's prefill (`outputs`: a `PrefillOutputs`)."""
        cfg = self.config
        p = self.probe_layer(state.P, adapter.n_layers)
        vpos, valid, kept = state.visual_pos, state.visual_valid, state.kept
        B, N = vpos.shape
        dev = vpos.device
        hid = outputs.probe_input  # [B, 1, D] of the last prompt token (P = 0: [B, T, D], the first stage's input)
        keys = None
        if state.P == 0:  # the probe layer is pruned: its keys of the reserve exist nowhere else
            hd = state.cos.shape[-1]
            idx_hd = vpos[..., None].expand(-1, -1, hd)
            hv = hid.gather(1, vpos[..., None].expand(-1, -1, hid.shape[-1]))
            keys = adapter.key(0, hv, state.cos.gather(1, idx_hd), state.sin.gather(1, idx_hd))
        q_last = adapter.query(p, hid[:, -1:], state.cos[:, -1:], state.sin[:, -1:])
        anchor = self._attend(self._scores(adapter, state, p, keys, q_last), kept)
        rank_of_pos = torch.full((B, state.T), -1, dtype=torch.long, device=dev)
        rank_of_pos.scatter_(1, vpos, torch.arange(N, device=dev).expand(B, N).masked_fill(~valid, -1))

        def rank_at(tags):  # visual rank of the token each slot holds (-1: text, padding or free)
            inside = (tags >= 0) & (tags < state.T)
            return torch.where(inside, rank_of_pos.gather(1, tags.clamp(0, state.T - 1)), -1)

        R = self._revival_slots(cfg, valid, kept)
        base_valid, slot_rank, reserve_rank = [], [], []
        for stage in state.stages:
            s = stage.store
            if cfg.source == "recompute" and s.reserve < R:  # each of a step's R queries writes a slot of its own
                s.grow_reserve(R - s.reserve)
            if cfg.variant == "hard":
                s.allow_holes()
            base_valid.append(s.prompt_valid(stage.Tk).clone())
            slot_rank.append(rank_at(s.prompt_tags(stage.Tk)))
            reserve_rank.append(rank_at(s.reserve_tags()).clone())
        st = DSTPState(
            adapter=adapter, linear_params=adapter.linear_params_per_layer(), probe=p, R=R, keys=keys, anchor=anchor, k=kept.sum(-1),
            remaining=torch.zeros(B, dtype=torch.long, device=dev),
            in_window=torch.zeros(B, dtype=torch.bool, device=dev),
            revived=torch.zeros(B, N, dtype=torch.bool, device=dev),
            hard_keep=torch.ones(B, N, dtype=torch.bool, device=dev),
            base_valid=base_valid, slot_rank=slot_rank, reserve_rank=reserve_rank,
            dropped_by=[valid & ~stage.kept for stage in state.stages],
            generator=torch.Generator(device="cpu").manual_seed(cfg.seed), reserve_kind=self.reserve_kind)
        if cfg.source == "recompute" and R > 0:
            self._setup_cache(st, state, outputs.hidden_at_prune)
        mark_static(st.tensors())
        return st

    def _setup_cache(self, st: DSTPState, state, hidden_at_prune):
        """`recompute`: nothing computed yet; the bound (`cache_tokens`, or the largest reserve) and what the
        computation starts from, for the reserve only."""
        reserve = state.visual_valid & ~state.kept
        largest = int(reserve.sum(-1).max())
        bound = largest if self.config.cache_tokens is None else min(self.config.cache_tokens, largest)
        if bound < st.R:
            raise ConfigError(f"DSTP cache_tokens={self.config.cache_tokens} is below the {st.R} tokens one shift "
                              f"may revive per sequence: they must fit (raise cache_tokens or lower max_revived)")
        D, vpos = hidden_at_prune.shape[-1], state.visual_pos
        rank, held = first_true(reserve, largest)
        st.hidden = hidden_at_prune.gather(1, vpos.gather(1, rank)[..., None].expand(-1, -1, D))
        rows = torch.arange(rank.shape[1], device=vpos.device).expand_as(rank)
        st.hidden_index = torch.full_like(vpos, -1).scatter(1, rank, torch.where(held, rows, -1))
        st.cached = torch.zeros_like(state.visual_valid)
        st.last_revived = torch.full_like(vpos, -1)
        st.cache_bound = bound

    @staticmethod
    def _scores(adapter, state, p: int, keys, q: torch.Tensor) -> torch.Tensor:
        """Scaled attention logits [B, H, Nmax] of one query row q [B, H, 1, hd] at the probe layer p on every
        visual token: from `keys` (P = 0), else from the keys the store of layers < P holds."""
        if keys is None:
            keys = state.full.layer_keys(p, state.T)
        B, H, _, hd = q.shape
        Hkv = keys.shape[1]
        scores = (q.reshape(B, Hkv, H // Hkv, hd).float() @ keys.float().transpose(-1, -2)).reshape(B, H, -1)
        scores = scores * adapter.attention_scale(p)
        if state.P > 0:
            scores = scores.gather(2, state.visual_pos[:, None, :].expand(-1, H, -1))
        return scores

    @staticmethod
    def _attend(scores: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
        """Head-mean softmax attention [B, N] of scores [B, H, N] over the tokens in `over` (zero elsewhere)."""
        probs = torch.softmax(scores.masked_fill(~over[:, None, :], float("-inf")), dim=-1)
        return probs.nan_to_num(0.0).mean(1)

    # -- each decoding step (tensor work only) ---------------------------------------------------
    def noise(self, st: DSTPState) -> torch.Tensor | None:
        """The `random` variant's draw for the next step, from DSTP's own generator (drawn by the loop, outside the
        step, which holds no generator)."""
        if self.config.variant != "random":
            return None
        return torch.rand(st.revived.shape, generator=st.generator).to(st.revived.device)

    def step(self, st: DSTPState, state, q_probe, noise) -> tuple[StepTrace, torch.Tensor]:
        """Detection, CPTS and the window bookkeeping for every row; (`recompute`) K/V of the tokens revived now that
        no reserve holds; the stores told what to read. Returns the step's trace and its extra FLOPs."""
        cfg = self.config
        kept, valid = state.kept, state.visual_valid
        scores = self._scores(st.adapter, state, st.probe, st.keys, q_probe)
        a_l = self._attend(scores, kept)
        sim = torch.nn.functional.cosine_similarity(a_l, st.anchor, dim=-1)
        shift = torch.ones_like(sim, dtype=torch.bool) if cfg.variant == "every_step" else sim < cfg.tau
        if cfg.force_every is not None:
            shift = shift | (state.step % cfg.force_every == 0)
        expired = (st.remaining == 0) & st.in_window & ~shift
        # CPTS for every row, whether or not it shifted
        a_r = self._attend(scores, valid & ~kept)
        target = self._target(torch.where(kept, a_l, a_r), valid, st, noise)
        revive = target & ~kept & shift[:, None]
        rank, rvalid = first_true(revive, st.R)  # at most R revived per row, in rank order
        new_revived = torch.zeros_like(revive).scatter(1, rank, rvalid) & revive
        st.revived.copy_(torch.where(shift[:, None], new_revived, st.revived & ~expired[:, None]))
        st.in_window.copy_((st.in_window | shift) & ~expired)
        st.remaining.copy_(torch.where(shift, cfg.window, st.remaining))
        if cfg.variant == "hard":
            st.hard_keep.copy_(torch.where(shift[:, None], target, st.hard_keep))
        extra = torch.zeros((), device=sim.device)
        if st.cached is not None:
            extra = self._recompute(st, state, new_revived, shift)
        reserve_read = self._tell_stores(st, state)
        active = self._active_count(st, state, reserve_read)
        st.remaining.copy_((st.remaining - 1).clamp(min=0))
        trace = StepTrace(visual_attended=active, similarity=sim, shift=shift, active=active,
                          revived_mask=st.revived.clone())
        return trace, extra

    def _target(self, scores, valid, st, noise) -> torch.Tensor:
        """T_l: the visual tokens to have active in the window (before the S0 union)."""
        v = self.config.variant
        if v == "all_tokens":
            return valid
        if v == "random":
            return topk_mask(noise, valid, st.k)
        return topk_mask(scores, valid, st.k)

    def _tell_stores(self, st: DSTPState, state):
        """Each stage's reserve slots are read iff their token is revived; (`hard`) kept slots outside the window's
        T_l are not read while the window is open. Returns the last stage's reserve slots read [B, reserve]."""
        for stage, ranks, base, slot_rank in zip(state.stages, st.reserve_rank, st.base_valid, st.slot_rank):
            read = (ranks >= 0) & st.revived.gather(1, ranks.clamp(min=0))
            stage.store.activate_reserve(read)
            if self.config.variant == "hard":
                keep = st.hard_keep.gather(1, slot_rank.clamp(min=0)) | (slot_rank < 0)
                stage.store.set_prompt_valid(torch.where(st.in_window[:, None], base & keep, base))
        return read

    @staticmethod
    def _active_count(st: DSTPState, state, reserve_read: torch.Tensor) -> torch.Tensor:
        """Visual tokens active at the last stage's layers, per row: kept slots read + revived slots read."""
        s, Tk = state.stages[-1].store, state.stages[-1].Tk
        return ((st.slot_rank[-1] >= 0) & s.prompt_valid(Tk)).sum(-1) + reserve_read.sum(-1)

    # -- recompute ---------------------------------------------------------------------------------
    @staticmethod
    def _evict(st: DSTPState, need, wanted) -> torch.Tensor:
        """[B, Nmax] the cached tokens to drop so that the ones `need` adds fit the bound: the least recently
        revived first, never one `wanted` now."""
        excess = (st.cached.sum(-1) + need.sum(-1) - st.cache_bound).clamp(min=0)
        candidate = st.cached & ~wanted
        age = torch.where(candidate, st.last_revived, torch.iinfo(torch.long).max)
        by_age = torch.argsort(age, dim=-1, stable=True)
        place = torch.empty_like(by_age).scatter_(1, by_age, torch.arange(age.shape[1], device=age.device)
                                                  .expand_as(by_age))
        return candidate & (place < excess[:, None])

    def _recompute(self, st: DSTPState, state, new_revived, shift) -> torch.Tensor:
        """`recompute` source: K/V at layers >= P of the revived tokens no reserve holds yet (`need`, at most R per
        row), computed into free reserve slots of every stage that dropped them. A token starts from its hidden state
        at the prune point of the first stage that dropped it and runs that stage's layers and every later one; in
        each stage it attends causally to the text prefix and the visual tokens that stage kept (not to other
        revived tokens), so its K/V equal those of a prefill that had also kept that one token, and stay valid for
        the rest of the sequence, whichever window revives it again. R query rows run every step; a row with nothing
        to compute at a stage writes nothing there. Returns the FLOPs of the rows that computed."""
        adapter, S = st.adapter, len(state.stages)
        need = new_revived & ~st.cached
        evicted = self._evict(st, need, new_revived)
        st.cached.copy_((st.cached & ~evicted) | need)
        st.last_revived.copy_(torch.where(new_revived, state.step, st.last_revived))
        # the R queries: each row's `need` tokens in rank order, then padding
        rank, nvalid = first_true(need, st.R)
        pos = state.visual_pos.gather(1, rank)
        first = torch.where(nvalid, state.dropped_at.gather(1, rank), S)  # the stage each token starts in
        D, hd = st.hidden.shape[-1], state.cos.shape[-1]
        h_drop = st.hidden.gather(1, st.hidden_index.gather(1, rank).clamp(min=0)[..., None].expand(-1, -1, D))
        cos = state.cos.gather(1, pos[..., None].expand(-1, -1, hd))
        sin = state.sin.gather(1, pos[..., None].expand(-1, -1, hd))
        pad = PAD_QUERY - torch.arange(st.R, device=pos.device).expand_as(pos)
        h, flops = h_drop, torch.zeros((), device=pos.device)
        for i, (stage, base) in enumerate(zip(state.stages, st.base_valid)):
            s, ranks = stage.store, st.reserve_rank[i]
            # evicted tokens leave the reserve; each live query takes a free slot of its own
            gone = (ranks >= 0) & evicted.gather(1, ranks.clamp(min=0))
            ranks = torch.where(gone, -1, ranks)
            live = nvalid & (first <= i)
            free, _ = first_true(ranks < 0, st.R)  # R distinct slots, the free ones first
            live_first = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)
            slots = torch.empty_like(free).scatter_(1, live_first, free)
            ranks = ranks.scatter(1, slots, torch.where(live, rank, ranks.gather(1, slots)))
            st.reserve_rank[i].copy_(ranks)
            tags = s.reserve_tags().scatter(1, slots, torch.where(live, pos, s.reserve_tags().gather(1, slots)))
            s.tag_reserve(torch.where(ranks >= 0, tags, NEVER))
            h = torch.where((first == i)[..., None], h_drop, h)  # tokens this stage dropped join here
            order = torch.where(live, pos, pad)
            # keys: the stage's kept prompt (causally) and the query's own slot; a query that computes nothing may
            # see anything (no empty row)
            mask = s.prompt_mask(order, base, slots) | ~live[:, None, :, None]
            attention = Attention(mask=mask)
            if adapter.window is not None:  # sliding layers: the prompt slots in the token's window (original index)
                attention = attention.with_sliding(Attention(
                    mask=s.prompt_mask(order, base, slots, adapter.window, state.prepared.attention_blocks)
                    | ~live[:, None, :, None]))
            h, _ = run_layers(adapter, stage.layers, h, attention, cos, sin,
                              s.scatter_view(slots, rows=live, returns="all"), torch.where(live, pos, -1),
                              state.prepared.extras)
            pairs = (mask[:, 0] & live[:, :, None]).sum()
            flops = flops + len(stage.layers) * (2.0 * st.linear_params * live.sum() +
                                                 4.0 * adapter.n_heads * adapter.head_dim * pairs)
        return flops

    # -- after the last step ------------------------------------------------------------------------
    def finish(self, trace, st: DSTPState, steps: int):
        """The per-step revived lists of the trace (host values: read once, after decoding)."""
        for step in trace.steps[:steps]:
            shift, revived = step.shift.tolist(), step.revived_mask
            step.revived = [torch.nonzero(revived[b]).flatten().tolist() if shift[b] else []
                            for b in range(len(shift))]
            step.revived_mask = None
