"""FastV: rank visual tokens by the last prompt token's head-mean attention at layer K-1; keep the top k
from layer K on."""
from __future__ import annotations

from dstp.pruners.base import Pruner, PruneResult, topk_mask


class FastV(Pruner):
    name = "fastv"
    default_layer = 2
    needs = ("attention",)

    def select(self, ctx) -> PruneResult:
        scores = ctx.visual_attention(ctx.last_token_position())[:, 0]  # [B, Nmax]
        return PruneResult(kept=topk_mask(scores, ctx.visual_valid, self.budget(ctx)))
