"""The byte-proportional ideal of a decoding run: what its steps must read for their active sets (weights, the K/V
attended and, for `recompute`, the weights it runs again on a step that revives), to compare measured decode time
against. Whatever a step reads beyond that (DSTP's masked reserve, a compiled step's unfilled slots, recompute's
query rows on steps that revive nothing) shows as decode/ideal above 1."""
from __future__ import annotations

import torch

from dstp.lab.bench.speed.config import SpeedConfig


def decode_bytes(cfg: SpeedConfig, adapter, engine, trace, source: str | None) -> float:
    """Bytes a run's decoding steps need: per step the weights once (shared by the batch) and, per row, the K/V
    slots it attends (layers < P: every prompt token and the generated ones; layers >= P: text, the active visual
    set, generated ones; VisionPulse: P is its anchor layer, and it reads the anchor's keys of every slot once to
    select); per step that revives, for `recompute`, the weights of layers >= P once more."""
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
            if step.selected_mask is not None:  # VisionPulse selects from the anchor layer's keys of every slot
                total += slot // 2 * (T + seen)
        if source is not None and step.revived is not None:
            revived = sum(len(r) for r in step.revived)
            if source == "recompute" and revived:
                total += (L - P) * engine.linear_params * eb
    return total
