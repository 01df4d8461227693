"""What the engine hands a pruner at a prune point, and what the pruner hands back.

Visual tokens are addressed by their rank among a row's visual tokens (0..N-1), padded to Nmax.
Attention rows are computed lazily, only when a method asks for them: `attention` from q of layer P-1 and the
keys that layer cached, `own_attention` from q and k of layer P itself on its input.

A multi-stage pruner is called once per prune point of its schedule (`ctx.stage` = 0, 1, ...). At stage s > 0
the tokens the earlier stages dropped are gone: `kept_before` says which visual tokens the sequence still holds,
and attention rows are softmaxed over the tokens present, as the model computes them on the shorter sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.models.base import PreparedInputs


@dataclass
class PruneResult:
    kept: torch.Tensor  # [B, Nmax] bool: which visual tokens survive (a subset of ctx.kept_before)
    hidden: torch.Tensor | None = None  # [B, Nmax, D] replacement hidden states at P (token merging)


def first_true(mask: torch.Tensor, n: int):
    """The first n True entries of each row of mask [B, S], in order: (their indices [B, n], valid [B, n]); rows
    with fewer are padded with indices of False entries."""
    index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :n]
    return index, torch.arange(index.shape[1], device=mask.device)[None] < mask.sum(-1, keepdim=True)


def visual_layout(visual_mask: torch.Tensor):
    """Original positions [B, Nmax] of each row's visual tokens (in order) and their validity."""
    n = visual_mask.sum(-1)
    pos, valid = first_true(visual_mask, int(n.max()) if n.numel() else 0)
    return pos, valid, n


def topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, N] of the k[b] highest scores among valid entries of each row (ties: lower index)."""
    s = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < k[:, None]) & valid


class PruneContext:
    """`hidden` [B, T, D] is in the prompt's original layout; the store, `probe_hidden`, `stage_hidden` and
    cos/sin are in the slot layout of the stage before P (`slot_order` [B, S]: original index of each slot,
    negative on padding; None: slot = original index, the unpruned prefix)."""

    def __init__(self, engine, prepared: PreparedInputs, layer: int, hidden: torch.Tensor, store=None,
                 probe_hidden: torch.Tensor | None = None, cos=None, sin=None, gen: torch.Generator | None = None,
                 relevant: torch.Tensor | None = None, stage: int = 0, kept_before: torch.Tensor | None = None,
                 slot_order: torch.Tensor | None = None, slot_valid: torch.Tensor | None = None,
                 stage_hidden: torch.Tensor | None = None):
        self.engine, self.prepared, self.layer = engine, prepared, layer
        self.hidden = hidden  # [B, T, D] at the prune point (embeddings when layer == 0); stale for dropped tokens
        self.visual_pos, self.visual_valid, self.n_visual = visual_layout(prepared.visual_mask)
        self.generator = gen
        self.relevant = relevant  # [B, Nmax] bool from outside (oracle)
        self.stage = stage
        self.kept_before = self.visual_valid if kept_before is None else kept_before
        T = hidden.shape[1]
        if slot_order is None:
            slot_order = torch.arange(T, device=hidden.device).expand(hidden.shape[0], T)
            slot_valid = prepared.attention_mask
        self._slot_order, self._slot_valid = slot_order, slot_valid
        self._store, self._probe_hidden, self._cos, self._sin = store, probe_hidden, cos, sin
        self._stage_hidden = hidden if stage_hidden is None else stage_hidden

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    @property
    def nmax(self) -> int:
        return self.visual_pos.shape[1]

    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the visual tokens at the prune point, [B, Nmax, D] (meaningful where kept_before)."""
        idx = self.visual_pos[..., None].expand(-1, -1, self.hidden.shape[-1])
        return self.hidden.gather(1, idx)

    # -- attention rows --------------------------------------------------------------------------------------
    def _slots(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Slot [B, Q] holding each query's original position (the queries must be present: text tokens)."""
        B, T = self.hidden.shape[:2]
        order, valid = self._slot_order, self._slot_valid
        inverse = torch.full((B, T + 1), -1, dtype=torch.long, device=order.device)
        inverse.scatter_(1, torch.where(valid, order, T), torch.arange(order.shape[1], device=order.device)
                         .expand_as(order))
        return inverse[:, :T].gather(1, query_pos)

    def _to_positions(self, probs: torch.Tensor, key_order: torch.Tensor) -> torch.Tensor:
        """[B, H, Q, S] over slots -> [B, H, Q, T] over original positions (0 where a token is absent)."""
        T = self.hidden.shape[1]
        index = torch.where((key_order >= 0) & (key_order < T), key_order, T)
        index = index[:, None, None, :].expand_as(probs)
        out = probs.new_zeros(*probs.shape[:3], T + 1)
        return out.scatter_add_(-1, index, probs)[..., :T]

    def attention(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [B, H, Q, T] at layer P-1 of the tokens at original positions `query_pos`
        [B, Q] (softmax over every key they may attend to, as the model computes it)."""
        if self.layer == 0:
            raise RuntimeError("attention scores need a prune layer >= 1")
        store = self._store
        probs = self.engine.attention_rows(self.layer - 1, self._probe_hidden, self._slots(query_pos), store,
                                           self._cos, self._sin)
        return self._to_positions(probs, store.order[:, :store.filled])

    def own_attention(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [B, H, Q, T] of layer P itself, from its q and k on its input (the layer has
        not run yet): what that layer would compute over the tokens present."""
        a, h = self.engine.adapter, self._stage_hidden
        slots = self._slots(query_pos)
        D, hd = h.shape[-1], self._cos.shape[-1]
        pick = lambda x, d: x.gather(1, slots[..., None].expand(-1, -1, d))
        q = a.query(self.layer, pick(h, D), pick(self._cos, hd), pick(self._sin, hd))  # [B, H, Q, hd]
        k = a.key(self.layer, h, self._cos, self._sin)
        k = k.repeat_interleave(a.n_heads // k.shape[1], dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * a.attention_scale(self.layer)
        order, valid = self._slot_order, self._slot_valid
        allowed = valid[:, None, None, :] & (order[:, None, None, :] <= query_pos[:, None, :, None])
        window = a.sliding_window(self.layer)
        if window is not None:
            allowed &= order[:, None, None, :] > query_pos[:, None, :, None] - window
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return self._to_positions(probs, order)

    def visual_attention(self, query_pos: torch.Tensor, own: bool = False) -> torch.Tensor:
        """Head-mean attention [B, Q, Nmax] of the queries on each visual token (0 on padding and on tokens an
        earlier stage dropped); `own`: of layer P itself instead of P-1."""
        probs = (self.own_attention(query_pos) if own else self.attention(query_pos)).mean(1)
        idx = self.visual_pos[:, None, :].expand(-1, probs.shape[1], -1)
        return probs.gather(2, idx).masked_fill(~(self.visual_valid & self.kept_before)[:, None, :], 0.0)

    def last_token_position(self) -> torch.Tensor:
        T = self.hidden.shape[1]
        return torch.full((self.batch, 1), T - 1, dtype=torch.long, device=self.hidden.device)
