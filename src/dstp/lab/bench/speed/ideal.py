"""The byte-proportional ideal of a decoding run: what its steps read (weights, the K/V attended, DSTP's moves of
revived K/V and, for `recompute`, the weights it runs again), to compare measured decode time against."""
from __future__ import annotations

import torch

from dstp.lab.bench.speed.config import SpeedConfig


def decode_bytes(cfg: SpeedConfig, adapter, engine, trace, source: str | None) -> float:
    """Bytes a run's decoding steps read: per step the weights once (shared by the batch) and, per row, the K/V
    slots it attends (layers < P: every prompt token and the generated ones; layers >= P: text, the active visual
    set, generated ones); per shift, moving the revived K/V into the head's last slots (read + write) and, for
    `recompute`, the weights of layers >= P once more."""
    a, L, B = adapter, cfg.layers, cfg.batch
    eb = torch.finfo(a.dtype).bits // 8
    slot = 2 * a.n_kv_heads * a.head_dim * eb
    N = cfg.visual_tokens
    T = cfg.prompt_tokens
    P = trace.prune_layer if trace.stages else L
    weights = (L * engine.linear_params + cfg.hidden * cfg.vocab) * eb
    total = 0.0
    for t, step in enumerate(trace.steps):
        total += weights
        seen = t + 1  # generated tokens in the cache, this one included
        for b in range(B):
            total += slot * (P * (T + seen) + (L - P) * (T - N + int(step.visual_attended[b]) + seen))
        if source is not None and step.revived is not None:
            revived = sum(len(r) for r in step.revived)
            total += 2 * revived * (L - P) * slot
            if source == "recompute" and revived:
                total += (L - P) * engine.linear_params * eb
    return total
