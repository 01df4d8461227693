"""The plugin's configuration: the `dstp` key of vLLM's `hf_overrides`, checked once, at engine start.

    LLM(model, hf_overrides={"dstp": {"method": "divprune", "retention": 0.25}})
    vllm serve MODEL --hf-overrides '{"dstp": {"method": "divprune", "retention": 0.25}}'

Keys: `method` (required), `retention` (required, in (0, 1]), `seed` (default 0; the `random` method's stream),
`contextual_fraction` (visionzip only, default dstp's 10/64: the share of an image's k tokens that are merged).
Nothing here imports vLLM: the same checks run in the engine-start hook, the processor and the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dstp.config import PruneConfig
from dstp.pruners.base import budget
from dstp.errors import ConfigError
from dstp.pruners import PRUNERS, get_pruner

KEY = "dstp"  # the attribute hf_overrides sets on the model's Hugging Face config

# methods the plugin runs inside vLLM: they pick (visionzip: merge) visual tokens before the LLM, from the image's
# own embeddings, its encoder's internals (visionzip) or its request's instruction (cdpruner)
RUNNABLE = ("divprune", "random", "uniform", "cdpruner", "visionzip")
CONDITIONAL = ("cdpruner",)  # conditioned on the prompt: the image's vLLM cache key includes its instruction

# why each other dstp method cannot run inside vLLM as it is (one line each; docs/vllm.md has the details)
NOT_RUNNABLE = {
    "fastv": "it prunes inside the LLM (at layer K from layer K-1's attention), but vLLM fixes every request's "
             "placeholder count before the LLM runs and has no per-request KV re-selection",
    "sparsevlm": "it prunes inside the LLM (several layers, from the text tokens' attention), but vLLM fixes every "
                 "request's placeholder count before the LLM runs and has no per-request KV re-selection",
    "pyramiddrop": "it prunes inside the LLM (at the end of each of its stages, from the last instruction token's "
                   "attention), but vLLM fixes every request's placeholder count before the LLM runs and has no "
                   "per-request KV re-selection",
    "oracle": "it needs ShiftBench's answer annotations, which a serving request does not carry",
    "evs": "it prunes videos, which the plugin passes through; vLLM ships EVS itself (--video-pruning-rate)",
}

ALLOWED_KEYS = ("method", "retention", "seed", "contextual_fraction")
DSTP_KEYS = ("shift", "dstp", "tau", "window", "source", "probe_layer", "max_revived", "variant")


class PluginConfigError(RuntimeError):
    """A `dstp` override the plugin cannot run. Not a ValueError (as dstp's ConfigError is): vLLM builds its
    configs as pydantic dataclasses, which turn a ValueError raised inside them into a multi-line
    ValidationError; this one reaches the caller as raised, one line."""


def fail(message: str) -> PluginConfigError:
    return PluginConfigError(f"dstp vLLM plugin: {message}")


@dataclass(frozen=True)
class Settings:
    """A checked configuration: the dstp pruner to run on each image, and how many tokens it keeps."""

    prune: PruneConfig

    @property
    def method(self) -> str:
        return self.prune.method

    @property
    def retention(self) -> float:
        return self.prune.retention

    @property
    def conditional(self) -> bool:
        """Whether the selection depends on the request's instruction as well as its image."""
        return self.method in CONDITIONAL

    def kept(self, n_visual: int) -> int:
        """k = ceil(retention * N) visual tokens of an image of N (at least 1), as dstp's engine counts them."""
        if n_visual <= 0:
            return 0
        return int(budget(torch.tensor([n_visual]), self.prune.retention)[0])

    def pruner(self, n_layers: int):
        return get_pruner(self.prune, n_layers)


def parse(raw) -> Settings:
    """Settings from the `dstp` override (a dict), or a ConfigError in one line."""
    if not isinstance(raw, dict):
        raise fail(f"hf_overrides['dstp'] must be a dict such as {{'method': 'divprune', 'retention': 0.25}}, "
                   f"got {type(raw).__name__}")
    dstp_keys = sorted(k for k in raw if k in DSTP_KEYS)
    if dstp_keys:
        raise fail(f"DSTP (decoding-stage re-selection: {', '.join(dstp_keys)}) cannot run inside vLLM: its "
                   f"placeholder counts are fixed before the LLM runs and it has no per-request KV re-selection "
                   f"(docs/vllm.md); use dstp.load(...) for DSTP")
    unknown = sorted(set(raw) - set(ALLOWED_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))} in hf_overrides['dstp']; known: "
                   f"{', '.join(ALLOWED_KEYS)}")
    if "method" not in raw or "retention" not in raw:
        raise fail("hf_overrides['dstp'] needs 'method' and 'retention', e.g. {'method': 'divprune', "
                   "'retention': 0.25}")
    method, retention, seed = raw["method"], raw["retention"], raw.get("seed", 0)
    if method not in PRUNERS:
        raise fail(f"unknown pruning method {method!r}; runnable in vLLM: {', '.join(RUNNABLE)}")
    if method not in RUNNABLE:
        raise fail(f"method {method!r} cannot run inside vLLM: {NOT_RUNNABLE.get(method, 'not supported')}; "
                   f"runnable: {', '.join(RUNNABLE)}")
    if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0.0 < retention <= 1.0:
        raise fail(f"retention must be in (0, 1], got {retention!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail(f"seed must be an integer, got {seed!r}")
    extra = {}
    if "contextual_fraction" in raw:
        if method != "visionzip":
            raise fail(f"contextual_fraction is a visionzip setting; method {method!r} has none")
        fraction = raw["contextual_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise fail(f"contextual_fraction must be in [0, 1), got {fraction!r}")
        extra["contextual_fraction"] = float(fraction)
    try:
        prune = PruneConfig(method=method, retention=float(retention), layer=0, seed=seed, **extra)
    except ConfigError as e:
        raise fail(str(e)) from None
    return Settings(prune=prune)


def from_hf_config(hf_config) -> Settings | None:
    """The checked settings of a model's (overridden) Hugging Face config; None when no `dstp` key was given."""
    raw = getattr(hf_config, KEY, None)
    return None if raw is None else parse(raw)
