"""SparseVLM (text-guided, inside the LLM): the prompt's text tokens rate the visual tokens.

Raters, per row: the text tokens after the row's first visual token (every text token if none follows
the image) whose head-mean attention mass on the visual tokens at layer K-1 is at least the mean mass of
those candidates (the most image-attentive candidate always rates). A visual token's score is the raters'
summed head-mean attention on it at layer K-1; the top k are kept from layer K on. (SparseVLM's token
recycling and progressive multi-layer schedule are not reproduced: one prune point, like every pruner.)"""
from __future__ import annotations

import torch

from dstp.pruners.base import Pruner, PruneResult, budget, topk_mask


def candidate_raters(prepared, visual_pos: torch.Tensor):
    """Positions [B, Q] of each row's rater candidates (padded with the last token) and their validity."""
    T = prepared.attention_mask.shape[1]
    text = prepared.attention_mask & ~prepared.visual_mask
    after = text & (torch.arange(T, device=text.device)[None, :] > visual_pos[:, :1])
    cand = torch.where(after.any(-1, keepdim=True), after, text)
    n = cand.sum(-1)
    Q = max(int(n.max()), 1)
    pos = torch.argsort((~cand).to(torch.int8), dim=-1, stable=True)[:, :Q]
    valid = torch.arange(Q, device=text.device)[None, :] < n[:, None]
    return torch.where(valid, pos, T - 1), valid


def rate(att: torch.Tensor, qvalid: torch.Tensor) -> torch.Tensor:
    """Scores [B, N] from candidates' head-mean attention on visual tokens att [B, Q, N]."""
    mass = att.sum(-1).masked_fill(~qvalid, float("-inf"))
    mean = mass.masked_fill(~qvalid, 0.0).sum(-1) / qvalid.sum(-1).clamp(min=1)
    raters = qvalid & (mass >= mean[:, None])
    raters |= torch.nn.functional.one_hot(mass.argmax(-1), mass.shape[1]).bool()
    return (att * raters[..., None]).sum(1)


class SparseVLM(Pruner):
    name = "sparsevlm"
    default_layer = 2
    needs = ("attention",)

    def select(self, ctx) -> PruneResult:
        qpos, qvalid = candidate_raters(ctx.prepared, ctx.visual_pos)
        scores = rate(ctx.visual_attention(qpos), qvalid)
        return PruneResult(kept=topk_mask(scores, ctx.visual_valid, budget(ctx)))
