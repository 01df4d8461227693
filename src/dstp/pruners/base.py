"""The pruner interface and the small tensor helpers every selector shares.

A pruner declares its prune point `layer` (0 = before the LLM) and what it `needs`, and `select(ctx)`
returns a `PruneResult` whose `kept` mask holds exactly k[b] = ceil(retention * N_b) visual tokens per
row (`self.budget(ctx)`: the retention is the pruner's own config) (visual tokens are addressed by rank 0..N_b-1 among the row's visual tokens, padded to Nmax).

A multi-stage pruner also sets `stage_layers`, its schedule of increasing prune points (`layer` is the first);
the engine calls `select(ctx)` once at each, with `ctx.stage` its index and `ctx.kept_before` the set the stage
before kept, and each call returns a subset of that set (its own budget). So the schedule is a list of
(layer, kept set) with shrinking sets, each stage's set decided on the sequence the stages before left.
"""
from __future__ import annotations

import torch

from dstp.config import PruneConfig
from dstp.engine.prune_context import PruneContext, PruneResult, topk_mask
from dstp.errors import ConfigError

NEEDS = ("attention", "vision_scores", "embeddings", "relevant")


def depth_scaled_layer(n_layers: int, layer: int = 2, of_layers: int = 32) -> int:
    """The prune point at the same fraction of depth as `layer` of `of_layers` (FastV's K=2 of LLaVA-1.5's 32
    layers), at least 1. It is 2 for 24-40-layer models and 1 for ShiftBench's 16: a tiny model with K=2
    would keep every visual token through an eighth of its depth, which no real model's K=2 does."""
    if n_layers < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    return max(1, min(n_layers - 1, round(layer * n_layers / of_layers)))


def stage_points(n_layers: int, points, first: int | None = None, method: str = "") -> tuple[int, ...]:
    """Prune points for a model of `n_layers` layers from depth-scaled `points`: the first replaced by `first`
    (a configured K) if given, then made strictly increasing within [1, n_layers - 1] (a shallow model gets
    neighbouring layers). A ConfigError when they do not fit."""
    pts = list(points)
    if first is not None:
        pts[0] = first
    for i in range(1, len(pts)):
        pts[i] = max(pts[i], pts[i - 1] + 1)
    for i in reversed(range(len(pts))):
        pts[i] = min(pts[i], n_layers - len(pts) + i)
    if pts[0] < 1 or (first is not None and pts[0] != first):
        where = f"from layer {first}" if first is not None else "inside it"
        raise ConfigError(f"{method}: {len(pts)} pruning stages do not fit a model of {n_layers} layers {where} "
                          f"(each stage needs a layer of its own, the last one below layer {n_layers})")
    return tuple(pts)


def check_shrinking(values, what: str, method: str) -> tuple:
    """Per-stage budgets (fractions of N) must lie in (0, 1] and shrink from stage to stage."""
    values = tuple(float(v) for v in values)
    if not values or any(not 0.0 < v <= 1.0 for v in values) or any(b >= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"{method}: {what} must be fractions in (0, 1] that shrink from stage to stage, "
                          f"got {list(values)}")
    return values


class Pruner:
    name: str = ""
    default_layer: int = 0  # of a 32-layer model; scaled to the model's depth (depth_scaled_layer)
    needs: tuple[str, ...] = ()
    multi_stage: bool = False  # True: `stage_layers` is set, `select` runs once per stage
    video_only: bool = False  # True: it prunes video tokens only (evs); a batch without video is refused
    stage_layers: tuple[int, ...] | None = None  # multi-stage pruners: the prune points, `layer` the first

    def __init__(self, config: PruneConfig, n_layers: int):
        self.config = config
        self.seed = config.seed  # Engine.generate seeds ctx.generator from it
        if config.layer is not None:
            self.layer = config.layer
        else:
            self.layer = depth_scaled_layer(n_layers, self.default_layer) if self.default_layer else 0
        if self.layer >= n_layers:  # K = n_layers would prune nothing that any layer reads
            raise ConfigError(f"{self.name}: prune layer {self.layer} is outside the model, which has "
                              f"{n_layers} layers (valid: 0..{n_layers - 1})")
        if "attention" in self.needs and self.layer == 0:
            raise ConfigError(f"{self.name} needs attention from layer K-1, so its prune layer K must be >= 1 "
                              f"(got 0)")

    def select(self, ctx: PruneContext) -> PruneResult:
        raise NotImplementedError

    def budget(self, ctx: PruneContext, fraction: float | None = None) -> torch.Tensor:
        """k[b] for this pruner's retention (or `fraction` of N, for a stage of a multi-stage schedule)."""
        return budget(ctx.n_visual, self.config.retention if fraction is None else fraction)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, retention={self.config.retention})"


def budget(n_visual: torch.Tensor, fraction: float) -> torch.Tensor:
    """k[b] = ceil(fraction * N_b), at least one token, never more than the row's N_b (a row without an image keeps
    nothing). The one budget rule: every pruner, DSTP's k and the vLLM plugin count with it."""
    k = torch.ceil(n_visual.double() * fraction - 1e-9).long().clamp(min=1)
    return torch.minimum(k, n_visual)


def require(ctx: PruneContext, method: str, what: str, value, source: str | None = None):
    """`value` from the context, or a ConfigError naming the method and what is missing (`source`: where
    it should have come from; default: the model family's adapter)."""
    if value is None:
        family = getattr(getattr(ctx.engine, "adapter", None), "family", "this model's")
        source = source or f"the {family} adapter does not provide it"
        raise ConfigError(f"{method} needs {what}, which is None: {source}")
    if value.shape[:2] != (ctx.batch, ctx.nmax):
        raise ConfigError(f"{method}: {what} has shape {tuple(value.shape)}, expected "
                          f"({ctx.batch}, {ctx.nmax}, ...) (batch, visual tokens)")
    return value.to(ctx.visual_valid.device)


def evenly_spaced(mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: count[b] entries of mask[b] at evenly spaced ranks (centred: rank (2i+1)M // 2count)
    among its M True entries, in index order. Requires count <= M."""
    B, N = mask.shape
    m = mask.sum(-1)
    members = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # True entries first, in order
    i = torch.arange(N, device=mask.device)[None, :]
    c = count[:, None].clamp(min=1)
    rank = ((2 * i + 1) * m[:, None]) // (2 * c)
    take = i < count[:, None]
    picked = members.gather(1, rank.clamp(max=N - 1))
    return scatter_true(picked, take, N)


def scatter_true(index: torch.Tensor, take: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [B, n], True at index[b, j] wherever take[b, j]."""
    index = torch.where(take, index, n)  # a spare column swallows the entries not taken
    out = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    return out.scatter_(1, index, True)[:, :n]


__all__ = ["Pruner", "PruneResult", "topk_mask", "budget", "require", "evenly_spaced", "scatter_true", "NEEDS",
           "stage_points", "check_shrinking"]
