"""Running a range of decoder layers over a cache view: the one loop the engine and a decode-time policy share."""
from __future__ import annotations

import torch

from dstp.engine.attention import Attention


def run_layers(adapter, layers: range, h: torch.Tensor, attention: Attention, cos, sin, cache, token_index,
               extras: dict, capture: int | None = None):
    """Decoder `layers` on hidden states h [B, Q, D], attending as `attention` over `cache` (a KV store view);
    sliding-window layers take `attention.sliding`.
    token_index: each query's original prompt index into the visual extras (DeepStack), None for generated tokens.
    Returns (h, the input of layer `capture`, or None)."""
    captured = None
    for i in layers:
        if i == capture:
            captured = h
        h = adapter.run_layer(i, h, attention.at_layer(adapter.sliding_window(i) is not None), cos, sin, cache)
        h = adapter.after_layer(i, h, token_index, extras)
    return h, captured
