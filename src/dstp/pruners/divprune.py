"""DivPrune: keep a maximally diverse subset of the visual tokens (greedy max-min cosine distance between
their embeddings at the prune point), before the LLM by default.

Greedy step 0 takes the token farthest from its nearest neighbour; every later step takes the token whose
distance to the nearest already-kept token is largest. Ties go to the lower index."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dstp.pruners.base import Pruner, PruneResult


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.float(), dim=-1)
    return 1.0 - x @ x.transpose(-1, -2)


def max_min_diverse(x: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: k[b] greedily max-min diverse rows of x[b] [N, D] among valid ones."""
    B, N, _ = x.shape
    inf = torch.tensor(float("inf"), device=x.device)
    dist = cosine_distance(x).masked_fill(~valid[:, None, :], inf)  # invalid tokens are never neighbours
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, inf).min(-1).values  # distance to the nearest other token
    kept = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    to_kept = torch.full((B, N), float("inf"), device=x.device)  # distance to the nearest kept token
    rows = torch.arange(B, device=x.device)
    for step in range(int(k.max()) if B else 0):
        score = nearest if step == 0 else to_kept
        pick = score.masked_fill(kept | ~valid, float("-inf")).argmax(-1)  # [B]
        active = step < k
        kept[rows, pick] |= active
        to_kept = torch.minimum(to_kept, dist[rows, pick])
    return kept


class DivPrune(Pruner):
    name = "divprune"
    default_layer = 0
    needs = ("embeddings",)

    def select(self, ctx) -> PruneResult:
        return PruneResult(kept=max_min_diverse(ctx.visual_hidden(), ctx.visual_valid, self.budget(ctx)))
