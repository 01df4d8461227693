"""Prefill-time visual token pruners behind one interface, looked up by name."""
from __future__ import annotations

from dstp.config import PruneConfig
from dstp.errors import ConfigError
from dstp.pruners.base import Pruner
from dstp.pruners.divprune import DivPrune
from dstp.pruners.fastv import FastV
from dstp.pruners.oracle import Oracle
from dstp.pruners.random import Random
from dstp.pruners.sparsevlm import SparseVLM
from dstp.pruners.uniform import Uniform
from dstp.pruners.visionzip import VisionZip

PRUNERS: dict[str, type[Pruner]] = {p.name: p for p in (FastV, DivPrune, VisionZip, SparseVLM, Random, Uniform,
                                                        Oracle)}


def check_method(method: str) -> str:
    if method not in PRUNERS:
        raise ConfigError(f"unknown pruning method {method!r}; known: {', '.join(sorted(PRUNERS))}")
    return method


def depth_scaled_layer(n_layers: int, layer: int = 2, of_layers: int = 32) -> int:
    """The prune point at the same fraction of depth as `layer` of `of_layers` (FastV's K=2 of LLaVA-1.5's 32
    layers), at least 1. It is 2 for 24-40-layer models and 1 for ShiftBench's 16: a tiny model with K=2
    would keep every visual token through an eighth of its depth, which no real model's K=2 does."""
    if n_layers < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    return max(1, min(n_layers - 1, round(layer * n_layers / of_layers)))


def get_pruner(config: PruneConfig, n_layers: int) -> Pruner:
    """The pruner `config.method` names, for a language model of `n_layers` layers."""
    return PRUNERS[check_method(config.method)](config, n_layers)


__all__ = ["Pruner", "PRUNERS", "get_pruner", "check_method", "depth_scaled_layer"]
