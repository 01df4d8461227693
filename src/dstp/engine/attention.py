"""dstp's attention call: the mask, the causal rule, the key range and the kernel are decided here.

The engine runs transformers' decoder layers, whose attention modules project and rotate q and k, write K/V to the
engine's cache view and then call the attention function registered under the language model's
`attn_implementation`. dstp registers its own (`models/hf_compat.py`), which hands the call to the `Attention` the
engine passed with the layer: so nothing depends on how transformers' SDPA function treats a missing mask, a longer
key sequence or grouped heads, which changes between its releases.

The kernel is PyTorch's `scaled_dot_product_attention`, with K/V repeated per query group (as transformers'
`repeat_kv`, so every query head sees its K/V head).

Sliding-window layers (docs/sliding-window.md): an `Attention` built for a model with a window carries the variant
its sliding layers use (`sliding`), whose mask also drops the keys at or before `query index - window` (original
indices); `at_layer` picks it, and refuses a sliding layer an attention built without its window. An eager decoding
step whose slots are in index order may read only the window's slots instead (`first_key`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Attention:
    """How one engine call attends: `mask` [B, 1, Tq, S] bool over the keys the cache returns (True: may attend),
    or None; `causal`: queries and keys are the same tokens in order (a prefill without padding), so the causal
    rule is the mask and SDPA may take its fused causal kernel. Neither: every query sees every key (a decoding step
    whose keys are all valid and all earlier)."""
    mask: torch.Tensor | None = None
    causal: bool = False
    sliding: "Attention | None" = None  # what sliding-window layers use (None: built for a model without them)
    first_key: int = 0  # keys before this one are not read, `mask` covers the rest (an eager step's window)

    def __post_init__(self):
        if self.causal and self.mask is not None:
            raise ValueError("Attention: give a mask or causal=True, not both")
        if self.first_key and self.causal:
            raise ValueError("Attention: first_key reads a suffix of the keys, not causally")

    def with_sliding(self, sliding: "Attention") -> "Attention":
        """This attention for full layers, `sliding` (itself without a variant) for sliding-window layers."""
        return Attention(self.mask, self.causal, Attention(sliding.mask, sliding.causal, first_key=sliding.first_key),
                         first_key=self.first_key)

    def at_layer(self, sliding: bool) -> "Attention":
        """The attention a layer uses: `sliding` says whether it is a sliding-window layer."""
        if not sliding:
            return self
        if self.sliding is None:
            raise RuntimeError("a sliding-window layer was handed an attention built without its window")
        return self.sliding

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """query [B, H, Tq, hd], key/value [B, Hkv, S, hd] -> [B, H, Tq, hd]."""
        if self.causal and key.shape[2] != query.shape[2]:
            raise ValueError(f"causal attention needs one key per query, got {query.shape[2]} queries and "
                             f"{key.shape[2]} keys")
        if self.first_key:
            key, value = key[:, :, self.first_key:], value[:, :, self.first_key:]
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=self.mask,
                                              is_causal=self.causal and query.shape[2] > 1, scale=scale)


CAUSAL = Attention(causal=True)
UNMASKED = Attention()
