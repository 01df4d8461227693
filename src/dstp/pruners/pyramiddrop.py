"""PyramidDrop (Xing et al., arXiv 2410.17247), the rule of the authors' code (Cooperx521/PyramidDrop, inference):
the LLM is cut into four stages at layers 8, 16 and 24 of 32 (depth-scaled: `depth_scaled_layer`), and at the
start of each later stage the visual tokens still present are ranked by the attention of the last instruction
token (the prompt's last token) in that stage's first layer, from its own q and k on its input (softmax over
every token present, head mean); the top lambda^s * N are kept, lambda fixed.

Departures (one line each; README "Pruners"):
- `retention` r is the last stage's share: lambda = r^(1/3), so the stages keep lambda, lambda^2 and r of N
  (r = 12.5% is the authors' setting lambda = 0.5); the authors set lambda directly;
- a stage keeps ceil(lambda^s * N) tokens (the authors' int() is the same for their 576 tokens and lambda 0.5);
- every token keeps its original position (the authors renumber the kept tokens 0..n-1);
- rows of a batch are ranked independently by their own last token (as the authors' per-row loop does), with
  left padding instead of their right padding.
"""
from __future__ import annotations

import torch

from dstp.errors import ConfigError
from dstp.pruners.base import Pruner, PruneResult, check_shrinking, depth_scaled_layer, stage_points, topk_mask

AUTHORS_LAYERS = (8, 16, 24)  # of 32: the first layer of stages 1, 2, 3


def stage_ratios(retention: float, n_stages: int = len(AUTHORS_LAYERS)) -> tuple[float, ...]:
    """lambda^1 .. lambda^S with lambda = retention^(1/S); the last is the retention itself."""
    lam = retention ** (1.0 / n_stages)
    return tuple(lam ** (s + 1) for s in range(n_stages - 1)) + (retention,)


class PyramidDrop(Pruner):
    name = "pyramiddrop"
    default_layer = 8
    needs = ("attention",)
    own_attention = True  # ranks by its prune layer's own attention, not the layer before (hybrid LLMs check it)
    multi_stage = True

    def __init__(self, config, n_layers: int, layers: tuple[int, ...] | None = None,
                 ratios: tuple[float, ...] | None = None):
        """`layers`: the prune points (default 8/16/24 of 32, depth-scaled; `config.layer` moves the first);
        `ratios`: the kept fraction of N at each, instead of lambda^s from the retention (must shrink)."""
        super().__init__(config, n_layers)
        points = layers or [depth_scaled_layer(n_layers, layer) for layer in AUTHORS_LAYERS]
        first = config.layer if layers is None else None
        self.stage_layers = stage_points(n_layers, points, first, self.name)
        self.layer = self.stage_layers[0]
        self.ratios = check_shrinking(ratios, "stage ratios", self.name) if ratios else None
        if self.ratios and len(self.ratios) != len(self.stage_layers):
            raise ConfigError(f"{self.name}: {len(self.ratios)} stage ratios for {len(self.stage_layers)} stages")

    def select(self, ctx) -> PruneResult:
        before = ctx.kept_before & ctx.visual_valid
        ratio = (self.ratios or stage_ratios(self.config.retention, len(self.stage_layers)))[ctx.stage]
        if ratio >= 1.0:
            return PruneResult(kept=before)
        score = ctx.visual_attention(ctx.last_token_position(), own=True)[:, 0]  # [B, Nmax]
        k = torch.minimum(self.budget(ctx, ratio), before.sum(-1))
        return PruneResult(kept=topk_mask(score, before, k))
