"""What the engine hands a pruner at the prune point P, and what the pruner hands back.

Visual tokens are addressed by their rank among a row's visual tokens (0..N-1), padded to Nmax.
Attention rows are computed lazily, only when a method asks for them, from q/k of layer P-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.models.base import PreparedInputs


@dataclass
class PruneResult:
    kept: torch.Tensor  # [B, Nmax] bool: which visual tokens survive
    hidden: torch.Tensor | None = None  # [B, Nmax, D] replacement hidden states at P (token merging)


def visual_layout(visual_mask: torch.Tensor):
    """Original positions [B, Nmax] of each row's visual tokens (in order) and their validity."""
    n = visual_mask.sum(-1)
    nmax = int(n.max()) if n.numel() else 0
    pos = torch.argsort((~visual_mask).to(torch.int8), dim=-1, stable=True)[:, :nmax]
    valid = torch.arange(nmax, device=visual_mask.device)[None, :] < n[:, None]
    return pos, valid, n


def budget(n_visual: torch.Tensor, retention: float) -> torch.Tensor:
    """k = ceil(retention * N) per row (at least one token)."""
    k = torch.ceil(n_visual.double() * retention - 1e-9).long()
    return torch.clamp(k, min=1)


def topk_mask(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, N] of the k[b] highest scores among valid entries of each row (ties: lower index)."""
    s = scores.float().masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return (rank < k[:, None]) & valid


class PruneContext:
    def __init__(self, engine, prepared: PreparedInputs, layer: int, hidden: torch.Tensor, retention: float,
                 full_store, probe_hidden: torch.Tensor | None, cos, sin, generator: torch.Generator,
                 relevant: torch.Tensor | None = None):
        self.engine, self.prepared, self.layer = engine, prepared, layer
        self.hidden = hidden  # [B, T, D] at the prune point (embeddings when layer == 0)
        self.retention = retention
        self.visual_pos, self.visual_valid, self.n_visual = visual_layout(prepared.visual_mask)
        self.k = budget(self.n_visual, retention)
        self.generator = generator
        self.relevant = relevant  # [B, Nmax] bool from outside (oracle)
        self._full, self._probe_hidden, self._cos, self._sin = full_store, probe_hidden, cos, sin

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    @property
    def nmax(self) -> int:
        return self.visual_pos.shape[1]

    def visual_hidden(self) -> torch.Tensor:
        """Hidden states of the visual tokens at the prune point, [B, Nmax, D]."""
        idx = self.visual_pos[..., None].expand(-1, -1, self.hidden.shape[-1])
        return self.hidden.gather(1, idx)

    def attention(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [B, H, Q, T] at layer P-1 of the tokens at `query_pos` [B, Q]
        (softmax over every key they may attend to, as the model computes it)."""
        if self.layer == 0:
            raise RuntimeError("attention scores need a prune layer >= 1")
        return self.engine.attention_rows(self.layer - 1, self._probe_hidden, query_pos, self._full,
                                          self._cos, self._sin)

    def visual_attention(self, query_pos: torch.Tensor) -> torch.Tensor:
        """Head-mean attention [B, Q, Nmax] of the queries on each visual token (0 on padding)."""
        probs = self.attention(query_pos).mean(1)
        idx = self.visual_pos[:, None, :].expand(-1, probs.shape[1], -1)
        return probs.gather(2, idx).masked_fill(~self.visual_valid[:, None, :], 0.0)

    def last_token_position(self) -> torch.Tensor:
        T = self.hidden.shape[1]
        return torch.full((self.batch, 1), T - 1, dtype=torch.long, device=self.hidden.device)

