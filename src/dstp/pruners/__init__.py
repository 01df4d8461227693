"""Prefill-time visual token pruners behind one interface, looked up by name."""
from __future__ import annotations

from dstp.config import PruneConfig
from dstp.errors import ConfigError
from dstp.pruners.base import Pruner, depth_scaled_layer
from dstp.pruners.cdpruner import CDPruner
from dstp.pruners.divprune import DivPrune
from dstp.pruners.evs import EVS
from dstp.pruners.fastv import FastV
from dstp.pruners.oracle import Oracle
from dstp.pruners.pyramiddrop import PyramidDrop
from dstp.pruners.random import Random
from dstp.pruners.sparsevlm import SparseVLM
from dstp.pruners.uniform import Uniform
from dstp.pruners.visionzip import VisionZip

PRUNERS: dict[str, type[Pruner]] = {p.name: p for p in (FastV, DivPrune, VisionZip, SparseVLM, CDPruner, Random,
                                                        Uniform, Oracle, PyramidDrop, EVS)}


def check_method(method: str) -> str:
    if method not in PRUNERS:
        raise ConfigError(f"unknown pruning method {method!r}; known: {', '.join(sorted(PRUNERS))}")
    return method


def get_pruner(config: PruneConfig, n_layers: int) -> Pruner:
    """The pruner `config.method` names, for a language model of `n_layers` layers."""
    return PRUNERS[check_method(config.method)](config, n_layers)


__all__ = ["Pruner", "PRUNERS", "get_pruner", "check_method", "depth_scaled_layer"]
