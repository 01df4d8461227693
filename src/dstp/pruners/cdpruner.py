"""CDPruner (Zhang et al., NeurIPS 2025; github.com/Theia-4869/CDPruner): keep the visual tokens that a conditional
determinantal point process finds most diverse given the instruction, before the LLM by default.

As the authors' code builds it: S = cosine similarity of the projected visual features (the LLM's input
embeddings of the visual tokens); relevance r_i = the mean over instruction embeddings of their cosine similarity
with token i, min-max normalised as (r - min + 1e-6) / (max - min); kernel L = diag(r) S diag(r) (the authors'
theta option is commented out in their code: not applied); then their fast greedy MAP inference (Chen et al.,
2018): k steps, each taking the token with the largest remaining gain d_i^2 (initially L_ii) and lowering every
gain by e_i^2, e = (L_j - sum_t c_t[j] c_t) / sqrt(d_j^2). The kept set is unordered (the LLM sees it in position
order). k = ceil(retention * N). Departures, one line each:
- relevance: the instruction embeddings are the LLM's input embeddings of the prompt's text after its last visual
  token (all its text where none follows), compared with the projected visual features; the authors embed the raw
  question with CLIP's text tower and the patches with CLIP's visual projection, which the HF checkpoints lack.
- sign: relevance is the similarity itself; the authors negate it for LLaVA's CLIP features only (a property of
  that encoder, their issue #14), which these LLM-space embeddings do not share.
- normalisation per prompt (the authors normalise over their whole tensor: one image, or all crops of one).
- rows with several images, LLaVA-NeXT crops and newline tokens: one DPP over all the row's visual tokens, newlines
  included (the authors: one DPP per crop with the same count each, newlines always kept).
- a constant relevance (no text, or identical scores) becomes 1 (the authors' formula divides by zero); a gain
  <= 0 (the kernel's rank, at most the feature size, is spent) updates nothing and the remaining picks follow the
  residual gains (the authors' loop would take the square root of a negative number).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dstp.pruners.base import Pruner, PruneResult


def instruction_mask(visual_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: each row's text tokens after its last visual token; all its text tokens where none follows."""
    T = visual_mask.shape[1]
    index = torch.arange(T, device=visual_mask.device).expand_as(visual_mask)
    last = torch.where(visual_mask, index, -1).max(-1).values
    text = attention_mask & ~visual_mask
    after = text & (index > last[:, None])
    return torch.where(after.any(-1, keepdim=True), after, text)


def relevance(visual: torch.Tensor, valid: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """[B, N] float32: mean cosine similarity of each visual token [B, N, D] with the row's instruction tokens
    [B, T, D] (`text_mask`), min-max normalised per row over its valid tokens as the authors do."""
    vn, tn = F.normalize(visual.float(), dim=-1), F.normalize(text.float(), dim=-1)
    w = text_mask.float()
    r = (vn @ tn.transpose(1, 2) * w[:, None, :]).sum(-1) / w.sum(-1, keepdim=True).clamp(min=1.0)
    lo = r.masked_fill(~valid, float("inf")).min(-1, keepdim=True).values
    hi = r.masked_fill(~valid, float("-inf")).max(-1, keepdim=True).values
    flat = ~(hi > lo) | ~text_mask.any(-1, keepdim=True)
    r = torch.where(flat, torch.ones_like(r), (r - lo + 1e-6) / torch.where(flat, 1.0, hi - lo))
    return r.masked_fill(~valid, 0.0)


def conditional_dpp(features: torch.Tensor, rel: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: k[b] tokens by greedy MAP inference of the DPP with kernel diag(rel) S diag(rel), S the cosine
    similarity of `features` [B, N, D]."""
    B, N, _ = features.shape
    fn = F.normalize(features.float(), dim=-1)
    kernel = rel[:, :, None] * (fn @ fn.transpose(1, 2)) * rel[:, None, :]
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    steps = int(k.max()) if B else 0
    c = torch.zeros(steps, B, N, device=features.device)
    kept = torch.zeros(B, N, dtype=torch.bool, device=features.device)
    rows = torch.arange(B, device=features.device)
    for i in range(steps):
        j = gain.masked_fill(kept | ~valid, float("-inf")).argmax(-1)  # [B]
        active = i < k
        d = gain[rows, j]
        e = (kernel[rows, j] - torch.einsum("tb,tbn->bn", c[:i, rows, j], c[:i])) / d.clamp(min=1e-30).sqrt()[:, None]
        c[i] = torch.where((active & (d > 0))[:, None], e, 0.0)
        gain = gain - c[i] ** 2
        kept[rows, j] |= active
    return kept


class CDPruner(Pruner):
    name = "cdpruner"
    default_layer = 0
    needs = ("embeddings",)

    def select(self, ctx) -> PruneResult:
        visual, valid = ctx.visual_hidden(), ctx.visual_valid
        mask = instruction_mask(ctx.prepared.visual_mask, ctx.prepared.attention_mask)
        rel = relevance(visual, valid, ctx.hidden, mask)
        return PruneResult(kept=conditional_dpp(visual, rel, valid, self.budget(ctx)))
