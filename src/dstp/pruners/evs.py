"""EVS, Efficient Video Sampling (Bagrov et al., "Efficient Video Sampling: Pruning Temporally Redundant Tokens for
Faster VLM Inference", arXiv 2510.14624), before the LLM, as vLLM ships it (`compute_retention_mask` and
`compute_retained_tokens_count` in vllm/multimodal/evs.py, called on Qwen2.5-VL's / Qwen3-VL's video embeddings):

- features: each video token's embedding as the LLM receives it (the vision tower's merger output), one token per
  merged 2x2 patch of one frame (a frame: one temporal patch, `temporal_patch_size` = 2 input frames);
- dissimilarity of a token = 1 - cosine(its embedding, the embedding of the same spatial token in the previous
  frame); the first frame's tokens get 255 (above any dissimilarity): the first frame is always kept whole;
- per video, keep the top max(h * w, int(t * h * w * (1 - q))) tokens by dissimilarity (descending, stable: ties
  go to the earlier token), with q = 1 - retention the pruning rate, t frames of h x w tokens.

Departures and what dstp adds, one line each:
- the budget is EVS's own per video (floor, at least the first frame), not dstp's k = ceil(retention * N) per row.
- images (and rows without a video) are kept whole, as vLLM's EVS prunes videos only; a batch with no video token
  at all is refused with a one-line ConfigError (EVS would prune nothing: an ignored setting), by the Pipeline
  before any model work (and here, for inputs prepared elsewhere).
- kept tokens keep their original positions (vLLM recomputes the M-RoPE positions of the kept ones: the same).
- cosine in float32 (vLLM: in the embeddings' dtype); Qwen3-VL: the main merger output, DeepStack features unused.
- LLaVA-OneVision: a frame is one input frame's pooled tokens (2x2 bilinear); each video's newline token,
  on no frame, is kept as images are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dstp.errors import ConfigError
from dstp.pruners.base import Pruner, PruneResult

FIRST_FRAME = 255.0  # vLLM's dissimilarity of the first frame's tokens


def evs_retained(total: torch.Tensor, per_frame: torch.Tensor, retention: float) -> torch.Tensor:
    """vLLM's count per video: max(tokens per frame, int(total * (1 - q))), q = 1 - retention."""
    q = 1.0 - retention
    return torch.maximum(per_frame, torch.floor(total.double() * (1.0 - q)).long())


def evs_keep(hidden: torch.Tensor, valid: torch.Tensor, video, retention: float) -> torch.Tensor:
    """Bool [B, N]: every valid non-video token, and each video's EVS selection. `hidden` [B, N, D] the visual
    tokens' embeddings, `video` the batch's VideoLayout (models/video.py)."""
    rows, ranks = torch.nonzero(video.is_video & valid, as_tuple=True)  # placeholder order
    prev = video.previous[rows, ranks]
    first = prev < 0
    x = hidden[rows, ranks].float()
    before = hidden[rows, prev.clamp(min=0)].float()
    dissimilarity = torch.where(first, FIRST_FRAME, 1.0 - F.cosine_similarity(x, before, dim=-1))
    group = rows * (int(video.video.max()) + 1) + video.video[rows, ranks]  # one id per video of the batch
    n_groups = int(group.max()) + 1 if group.numel() else 0
    total = torch.bincount(group, minlength=n_groups)
    retain = evs_retained(total, torch.bincount(group[first], minlength=n_groups), retention)
    order = torch.argsort(dissimilarity, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by video, most dissimilar first within each
    sorted_group = group[order]
    place = torch.arange(order.numel(), device=order.device) - torch.searchsorted(sorted_group, sorted_group)
    keep = torch.zeros_like(first)
    keep[order] = place < retain[sorted_group]
    kept = valid & ~video.is_video
    kept[rows, ranks] = keep
    return kept


class EVS(Pruner):
    name = "evs"
    default_layer = 0
    needs = ("embeddings",)
    video_only = True  # Pipeline refuses a batch without video before any model work

    def __init__(self, config, n_layers: int):
        super().__init__(config, n_layers)
        if self.layer != 0:
            raise ConfigError(f"evs compares the video's embeddings frame to frame before the LLM (layer 0), not "
                              f"at layer {self.layer}")

    def select(self, ctx) -> PruneResult:
        video = getattr(ctx.prepared, "video", None)
        if video is None or not bool((video.is_video & ctx.visual_valid).any()):
            raise ConfigError("evs prunes video tokens only (frame against frame) and these inputs hold no video; "
                              "use another method for images")
        return PruneResult(kept=evs_keep(ctx.visual_hidden(), ctx.visual_valid, video, self.config.retention))
