"""VisionZip: dominant tokens by the vision encoder's attention (`prepared.vision_scores`: CLS attention
where the encoder has a CLS token, mean received attention otherwise; see the adapters), plus contextual
tokens that summarise the rest. Before the LLM by default.

Of the budget k, k_ctx = round(contextual_fraction * k) (at most k - 1) tokens are contextual: targets
at evenly spaced ranks among the non-dominant tokens; every other non-dominant token is averaged into its
most similar target (cosine similarity of the embeddings at the prune point), target included."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dstp.pruners.base import Pruner, PruneResult, budget, evenly_spaced, require, topk_mask


def zip_tokens(scores, x, valid, k, fraction: float):
    """(kept [B, N] bool, hidden [B, N, D]): dominant top-(k - k_ctx) by score plus k_ctx merged targets."""
    B, N, _ = x.shape
    k_ctx = torch.minimum(torch.round(fraction * k.double()).long(), k - 1).clamp(min=0)
    dominant = topk_mask(scores, valid, k - k_ctx)
    rest = valid & ~dominant
    targets = evenly_spaced(rest, k_ctx)
    merged_away = rest & ~targets
    xn = F.normalize(x.float(), dim=-1)
    sim = (xn @ xn.transpose(1, 2)).masked_fill(~targets[:, None, :], float("-inf"))
    assign = F.one_hot(sim.argmax(-1), N).float() * merged_away[..., None].float()  # [B, source, target]
    assign = assign + torch.diag_embed(targets.float())  # each target averages itself in
    sums = assign.transpose(1, 2) @ x.float()
    merged = sums / assign.sum(1).clamp(min=1.0)[..., None]
    hidden = torch.where(targets[..., None], merged.to(x.dtype), x)
    return dominant | targets, hidden


class VisionZip(Pruner):
    name = "visionzip"
    default_layer = 0
    needs = ("vision_scores", "embeddings")

    def select(self, ctx) -> PruneResult:
        scores = require(ctx, self.name, "the vision encoder's attention (prepared.vision_scores)",
                         ctx.prepared.vision_scores,
                         "prepare the inputs with vision_scores=True, or check that this family's adapter computes them")
        kept, hidden = zip_tokens(scores, ctx.visual_hidden(), ctx.visual_valid, budget(ctx),
                                  self.config.contextual_fraction)
        return PruneResult(kept=kept, hidden=hidden)
