"""Every transformers-version-sensitive call in one place.

transformers 4.x passed the cache to attention as `past_key_value` and decoder layers returned tuples;
5.x uses `past_key_values` and returns the hidden states tensor. Tested range: see pyproject.toml.
"""
from __future__ import annotations

import inspect

import torch


def _cache_kwarg(layer) -> str:
    params = inspect.signature(type(layer).forward).parameters
    return "past_key_values" if "past_key_values" in params else "past_key_value"


_KWARG_BY_CLASS: dict[type, str] = {}


def call_decoder_layer(layer, hidden, mask, position_embeddings, cache):
    kind = type(layer)
    if kind not in _KWARG_BY_CLASS:
        _KWARG_BY_CLASS[kind] = _cache_kwarg(layer)
    out = layer(
        hidden,
        attention_mask=mask,
        position_embeddings=position_embeddings,
        use_cache=True,
        **{_KWARG_BY_CLASS[kind]: cache},
    )
    return out[0] if isinstance(out, tuple) else out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard (non-interleaved) RoPE, as every supported family applies it after its cos/sin layout."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
