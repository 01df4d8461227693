"""Uniform: a spatial stride, k evenly spaced ranks over the row's visual tokens 0..N-1 in raster order
(rank (2i+1)N // 2k for i < k, so k = 1 keeps the middle token and k = N keeps all)."""
from __future__ import annotations

from dstp.pruners.base import Pruner, PruneResult, evenly_spaced


class Uniform(Pruner):
    name = "uniform"
    default_layer = 0

    def select(self, ctx) -> PruneResult:
        return PruneResult(kept=evenly_spaced(ctx.visual_valid, self.budget(ctx)))
