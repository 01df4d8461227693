"""Typed, frozen configuration passed explicitly (no environment variables, no hidden offsets)."""
from __future__ import annotations

from dataclasses import dataclass

from dstp.errors import ConfigError


def check_retention(retention: float) -> float:
    if not isinstance(retention, (int, float)) or not (0.0 < float(retention) <= 1.0):
        raise ConfigError(f"retention must be in (0, 1], got {retention!r}")
    return float(retention)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, with transformers' meaning and defaults: greedy unless `do_sample`; when sampling,
    the logits go through repetition penalty, temperature, top-k, then top-p, as in `generate()`.
    `repetition_penalty` also applies to greedy decoding (as in transformers)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # 0: off
    repetition_penalty: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos tokens

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs the decoding step. `compile`: under `torch.compile(fullgraph=True)` (on CUDA with CUDA
    graphs: `compile_mode` None picks "reduce-overhead" there, the default mode elsewhere); `compile_fallback`: run
    eagerly instead of failing when this torch cannot compile on the device. `stop_check_every`: the loop reads
    whether every row has stopped once every this many steps (its only host read while decoding); rows that
    stopped in between run on, and what they generate after their stop is discarded."""

    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    compile_fallback: bool = False
    stop_check_every: int = 8

    def __post_init__(self):
        if isinstance(self.stop_check_every, bool) or not isinstance(self.stop_check_every, int) \
                or self.stop_check_every < 1:
            raise ConfigError(f"stop_check_every must be an integer >= 1, got {self.stop_check_every!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be True or False, got {self.compile!r}")


GENERATION_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop_token_ids")


def generation_config(max_new_tokens: int, checkpoint: dict, explicit: dict) -> GenerationConfig:
    """The settings of one call: the checkpoint's `generation_config.json` defaults (`checkpoint`), overridden by
    what the caller passed (`explicit`). An explicit `do_sample=False` is plain greedy: the checkpoint's sampling
    settings and repetition penalty are dropped (transformers would keep its repetition penalty)."""
    unknown = sorted(set(explicit) - set(GENERATION_FIELDS))
    if unknown:
        raise ConfigError(f"unknown generation argument(s) {', '.join(unknown)}; known: "
                          f"max_new_tokens, {', '.join(GENERATION_FIELDS)}")
    base = {} if explicit.get("do_sample") is False else dict(checkpoint)
    settings = {**base, **{k: v for k, v in explicit.items() if v is not None}}
    if isinstance(settings.get("stop_token_ids"), int):
        settings["stop_token_ids"] = (settings["stop_token_ids"],)
    elif settings.get("stop_token_ids") is not None:
        settings["stop_token_ids"] = tuple(settings["stop_token_ids"])
    return GenerationConfig(max_new_tokens=max_new_tokens, **settings)


@dataclass(frozen=True)
class PruneConfig:
    """Prefill-time visual token pruning. `layer` is the prune point K (None: the method's default;
    0 = before the LLM). k = ceil(retention * N) visual tokens are kept per image."""

    method: str = "fastv"
    retention: float = 1.0
    layer: int | None = None
    seed: int = 0
    # visionzip: fraction of the kept budget spent on merged contextual tokens (the authors' 10 of 64)
    contextual_fraction: float = 10 / 64

    def __post_init__(self):
        check_retention(self.retention)
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"prune layer must be >= 0, got {self.layer}")
        if not 0.0 <= self.contextual_fraction < 1.0:
            raise ConfigError(f"contextual_fraction must be in [0, 1), got {self.contextual_fraction}")


SOURCES = ("recompute", "store")
VARIANTS = ("dstp", "random", "hard", "every_step", "all_tokens")


@dataclass(frozen=True)
class DSTPConfig:
    """Decoding-stage shift-aware token pruning (DESIGN §5)."""

    tau: float = 0.75
    window: int = 20
    probe_layer: int | None = None  # None: P-1 for in-LLM pruners, 0 for pre-LLM ones
    source: str = "recompute"
    max_revived: int | None = None  # None: k (all_tokens: N - k)
    variant: str = "dstp"
    seed: int = 0
    force_every: int | None = None  # benchmarks/tests: also declare a shift at every n-th decode step
    # recompute: visual tokens per sequence whose K/V the pruned stores' heads keep (None: the whole reserve, never
    # evicts); when full, the least recently revived tokens are evicted and recomputed if revived again. At least
    # the tokens one shift may revive per sequence (max_revived, default k)
    cache_tokens: int | None = None

    def __post_init__(self):
        if self.force_every is not None and self.force_every < 1:
            raise ConfigError(f"force_every must be >= 1, got {self.force_every}")
        if not -1.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau must be in [-1, 1], got {self.tau}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.source not in SOURCES:
            raise ConfigError(f"unknown DSTP source {self.source!r}; known: {', '.join(SOURCES)}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown DSTP variant {self.variant!r}; known: {', '.join(VARIANTS)}")
        if self.max_revived is not None and self.max_revived < 1:
            raise ConfigError(f"max_revived must be >= 1, got {self.max_revived}")
        if self.cache_tokens is not None and (isinstance(self.cache_tokens, bool) or not isinstance(self.cache_tokens, int)
                                              or self.cache_tokens < 1):
            raise ConfigError(f"cache_tokens must be an integer >= 1, got {self.cache_tokens!r}")
        if self.cache_tokens is not None and self.max_revived is not None and self.cache_tokens < self.max_revived:
            raise ConfigError(f"cache_tokens={self.cache_tokens} must be >= max_revived={self.max_revived}: one "
                              f"shift's revived tokens must fit in the cache")
        if self.probe_layer is not None and self.probe_layer < 0:
            raise ConfigError(f"probe_layer must be >= 0, got {self.probe_layer}")


@dataclass(frozen=True)
class VisionPulseConfig:
    """VisionPulse (arXiv 2605.31457): step-wise visual token selection while decoding (docs/visionpulse.md).
    Defaults: the authors' 10% setting (Qwen3-VL-4B/8B-Thinking-VisionPulse-10pct); `setting("5pct")` gives their
    5% one. `fixed_budget`: a constant retention ratio instead of the attention-mass budget (their `budget`)."""

    # zero-based, the layer that selects; None: theirs (17 of their models' 36 layers) at the same fraction of depth
    anchor_layer: int | None = None
    visual_mass_tau: float = 0.4
    budget_min: float = 0.05
    budget_max: float = 0.10
    fixed_budget: float | None = None

    SETTINGS = {"10pct": dict(visual_mass_tau=0.4, budget_min=0.05, budget_max=0.10),
                "5pct": dict(visual_mass_tau=0.1, budget_min=0.01, budget_max=0.05)}

    @classmethod
    def setting(cls, name: str, **overrides) -> "VisionPulseConfig":
        if name not in cls.SETTINGS:
            raise ConfigError(f"unknown VisionPulse setting {name!r}; known: {', '.join(cls.SETTINGS)}")
        return cls(**{**cls.SETTINGS[name], **overrides})

    def __post_init__(self):
        if self.anchor_layer is not None and (isinstance(self.anchor_layer, bool)
                                              or not isinstance(self.anchor_layer, int) or self.anchor_layer < 1):
            raise ConfigError(f"VisionPulse anchor_layer must be an integer >= 1, got {self.anchor_layer!r}")
        if not self.visual_mass_tau > 0:
            raise ConfigError(f"VisionPulse visual_mass_tau must be > 0, got {self.visual_mass_tau}")
        for name in ("budget_min", "budget_max", "fixed_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 < float(value) <= 1.0):
                raise ConfigError(f"VisionPulse {name} must be in (0, 1], got {value!r}")
        if self.budget_min > self.budget_max:
            raise ConfigError(f"VisionPulse budget_min={self.budget_min} is above budget_max={self.budget_max}")
