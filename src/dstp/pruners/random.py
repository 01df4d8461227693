"""Random: k visual tokens drawn uniformly without replacement. Each row draws from its own stream
(seeded from ctx.generator and the row index), so a row's set does not depend on the other rows."""
from __future__ import annotations

import torch

from dstp.pruners.base import Pruner, PruneResult, topk_mask


def random_scores(n_visual: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, max N] uniform scores; row b's depend only on (generator state, b, n_visual[b])."""
    base = int(torch.randint(0, 2**62, (1,), generator=generator))
    rows = [torch.rand(int(n), generator=torch.Generator().manual_seed(base + b)) for b, n in enumerate(n_visual)]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


class Random(Pruner):
    name = "random"
    default_layer = 0

    def select(self, ctx) -> PruneResult:
        scores = random_scores(ctx.n_visual.cpu(), ctx.generator).to(ctx.visual_valid.device)
        return PruneResult(kept=topk_mask(scores, ctx.visual_valid, self.budget(ctx)))
