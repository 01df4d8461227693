"""Oracle (ShiftBench): keeps the visual tokens the answer needs (`ctx.relevant`), then fills the rest of
the budget with evenly spaced tokens (uniform stride) among the others. When more than k tokens are
relevant, k of them are kept, evenly spaced among the relevant ones. Deterministic."""
from __future__ import annotations

import torch

from dstp.pruners.base import Pruner, PruneResult, evenly_spaced, require


def oracle_mask(relevant: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    rel = relevant & valid
    take = torch.minimum(rel.sum(-1), k)
    return evenly_spaced(rel, take) | evenly_spaced(valid & ~rel, k - take)


class Oracle(Pruner):
    name = "oracle"
    default_layer = 0
    needs = ("relevant",)

    def select(self, ctx) -> PruneResult:
        relevant = require(ctx, self.name, "ctx.relevant", ctx.relevant,
                           "pass relevant= (which visual tokens each answer needs; ShiftBench knows them)")
        return PruneResult(kept=oracle_mask(relevant.bool(), ctx.visual_valid, self.budget(ctx)))
