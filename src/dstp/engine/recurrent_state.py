"""Per-row recurrent state of linear-attention layers (Qwen3.5's Gated DeltaNet), owned by the engine.

A linear-attention layer keeps no per-token K/V: it keeps, per row, the last few inputs of its causal convolution
(`conv` [B, C, kernel]) and a fixed-size recurrent state (`recurrent` [B, H, dk, dv]). A prefill sets both from
the row's tokens in order (padding first, masked out as transformers masks left padding); each decoding step
updates them in place, so their addresses stay fixed (CUDA graphs) and a compiled step reads no host value.
A `LinearStep` is what one layer call sees: the layer's states, whether this call is a prefill and its padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class RecurrentStates:
    """The states of the linear-attention layers of one KV store's layer range, created by their prefill."""

    def __init__(self):
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}

    def buffers(self) -> list[torch.Tensor]:
        return [*self.conv.values(), *self.recurrent.values()]


@dataclass
class LinearStep:
    """One linear-attention layer call: `prefill` (the state starts from zero and is set from these tokens, whose
    padding `mask` [B, Q] marks, None: none) or a decoding step (one token per row, the state updated in place)."""
    states: RecurrentStates
    layer_idx: int
    prefill: bool
    mask: torch.Tensor | None = None
