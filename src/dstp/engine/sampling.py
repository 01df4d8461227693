"""Next-token selection with transformers' logits processing, vectorised over the batch.

Order and rules as in `generate()`: repetition penalty (greedy too), then, when sampling, temperature, top-k
(ties at the k-th value kept), top-p (the smallest tail whose mass exceeds 1 - top_p is removed, at least one
token kept), softmax, and a draw: the inverse of the distribution's CDF at a uniform number the caller drew from
its seeded generator (one per row and step), so that the step itself holds no generator and compiles."""
from __future__ import annotations

import torch

from dstp.config import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Logits of tokens already in the sequence (`seen` [B, V] bool) divided by `penalty` (multiplied when
    negative), as transformers' RepetitionPenaltyLogitsProcessor does."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= 1 - top_p
    remove[..., -1] = False  # keep at least the most likely token
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def warp(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Sampling warpers (temperature, top-k, top-p) on float logits [B, V]."""
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return logits


def next_token(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None,
               uniform: torch.Tensor | None) -> torch.Tensor:
    """The next token per row from logits [B, V]; `seen` marks tokens already in each sequence (needed only
    when `config.repetition_penalty != 1`); `uniform` [B] in [0, 1) (needed only when sampling)."""
    logits = logits.float()
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if not config.do_sample:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(warp(logits, config), dim=-1).cumsum(-1)
    below = cdf < uniform[:, None] * cdf[:, -1:]  # tokens whose cumulative mass lies below the draw
    return below.sum(-1).clamp(max=logits.shape[-1] - 1)
