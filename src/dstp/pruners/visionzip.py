"""VisionZip (Yang et al., CVPR 2025; github.com/dvlab-research/VisionZip), before the LLM, as the authors' code
computes it for LLaVA-1.5, on the vision encoder's internals (`PreparedInputs.vision`, see `dstp.models.vision`):

- dominant: the CLS token, then the patches with the highest CLS attention (head mean; the authors sum over
  heads, same order) at the vision feature layer;
- contextual: among the remaining patches in index order (M of them), targets at ranks 0, s, 2s, ... with
  s = max(1, M // c), the first c of them; every other remaining patch goes to the target whose feature-layer key
  (head mean) has the highest cosine similarity; a contextual token is target + mean(its assigned patches), in
  the encoder's space before the projector, then projected;
- the split: of a view's k tokens, c = round(k * contextual_fraction) are contextual (default 10/64: the authors'
  presets 54+10, 108+20, 162+30 for 64 / 128 / 192 of 576 tokens), the other k - c dominant, CLS included.

k = ceil(retention * N) counts every token the LLM receives, the CLS token included. Departures, one line each:
- positions: every kept token keeps its own position; the CLS token takes the position of the first patch of its
  view that is neither dominant nor a target (the authors' LLM sees a contiguous [CLS, dominant, contextual]).
- several views in a row (images, LLaVA-NeXT crops, InternVL tiles): k is shared out over the views by their
  token counts (largest remainder), each view zipped on its own (the authors: the same counts per crop).
- LLaVA-NeXT: patches cut by unpadding are not candidates and newline tokens are kept only when k exceeds the
  patches (the authors keep dominant crop patches in the padded grid, without unpadding or newlines).
- Qwen2.5-VL / Qwen3-VL (no CLS token): a unit is one merged token (2x2 patches): score = the attention its
  patches receive in the last ViT block, key = its patches' mean key (before rotary), merged in the merger's
  input space; no CLS to keep. Qwen3-VL's DeepStack features of a contextual token stay its target's own.
- LLaVA-OneVision (SigLIP, no CLS token): units as LLaVA-NeXT's, score = the attention a patch receives at the feature
  layer (head mean, over its view's queries); an image whose crop features the model downsamples is refused.
- InternVL: a unit is one pixel-shuffled token, scored and keyed by its patches' mean; InternViT's CLS token is
  not kept (the projector reads groups of four patches, a single CLS has no place there).
- ShiftBench (no encoder attention): score = feature norm, key = features = the visual token, identity projector.
- k >= N keeps every token unmerged (the unpruned model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dstp.errors import ConfigError
from dstp.pruners.base import Pruner, PruneResult


def share(k: int, counts: list[int]) -> list[int]:
    """k split over parts of sizes `counts` in proportion (largest remainder, ties to the first), each at most its size."""
    total = sum(counts)
    if total == 0:
        return [0] * len(counts)
    k = min(k, total)
    exact = [k * n / total for n in counts]
    out = [int(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: -(exact[i] - int(exact[i])))[: k - sum(out)]:
        out[i] += 1
    return out


def contextual_count(k: int, fraction: float) -> int:
    """c = round(k * fraction) (half up) of a view's k >= 1 tokens, leaving at least one dominant token."""
    return min(int(k * fraction + 0.5), k - 1)


def zip_view(scores: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, n_dominant: int, n_contextual: int):
    """One view's units (index order): (dominant indices, target indices, merged target features [c, U] float32)."""
    S = scores.shape[0]
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    dominant = order[:n_dominant].sort().values
    is_rest = torch.ones(S, dtype=torch.bool, device=scores.device)
    is_rest[dominant] = False
    rest = torch.nonzero(is_rest).flatten()
    if n_contextual == 0:
        return dominant, rest[:0], hidden.new_zeros(0, hidden.shape[-1], dtype=torch.float32)
    step = max(1, rest.numel() // n_contextual)
    picks = torch.arange(0, rest.numel(), step, device=scores.device)[:n_contextual]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=scores.device)
    is_target[picks] = True
    targets, others = rest[is_target], rest[~is_target]
    kn = F.normalize(keys.float(), dim=-1)
    assign = (kn[others] @ kn[targets].T).argmax(-1)
    sums = torch.zeros(n_contextual, hidden.shape[-1], device=hidden.device).index_add_(0, assign, hidden[others].float())
    count = torch.bincount(assign, minlength=n_contextual).clamp(min=1)
    return dominant, targets, hidden[targets].float() + sums / count[:, None]


def require_internals(ctx, method: str):
    vision = getattr(ctx.prepared, "vision", None)
    if vision is not None:
        return vision
    adapter = getattr(ctx.engine, "adapter", None)
    if adapter is not None and not getattr(adapter, "vision_internals", False):
        raise ConfigError(f"{method} needs the vision encoder's internals (CLS attention, keys, features before the "
                          f"projector), which the {adapter.family} family cannot provide")
    raise ConfigError(f"{method} needs the vision encoder's internals (prepared.vision), which these inputs lack: "
                      f"prepare them with vision_scores=True")


class VisionZip(Pruner):
    name = "visionzip"
    default_layer = 0
    needs = ("vision_scores", "embeddings")  # vision_scores: prepare computes the encoder internals

    def __init__(self, config, n_layers: int):
        super().__init__(config, n_layers)
        if self.layer != 0:
            raise ConfigError(f"visionzip merges in the vision encoder's space, so it runs before the LLM (layer 0), "
                              f"not at layer {self.layer}")

    def select(self, ctx) -> PruneResult:
        vision = require_internals(ctx, self.name)
        k, n = self.budget(ctx).tolist(), ctx.n_visual.tolist()
        kept = torch.zeros(ctx.batch, ctx.nmax, dtype=torch.bool, device=ctx.visual_valid.device)
        hidden = ctx.visual_hidden().clone()
        offsets = torch.tensor([0] + n[:-1]).cumsum(0).tolist()
        valid = vision.valid
        counts = valid.sum(-1).tolist()
        first = torch.where(valid, vision.slot, torch.iinfo(torch.long).max).min(-1).values.tolist()
        views = {}  # row -> its views, in order
        for v, (s, c) in enumerate(zip(first, counts)):
            if c:
                views.setdefault(max(b for b in range(ctx.batch) if offsets[b] <= s), []).append(v)
        slots, merged = [], []  # (row, rank) of each token to project, and its features
        for b in range(ctx.batch):
            if k[b] >= n[b]:
                kept[b, : n[b]] = True
                continue
            mine = views.get(b, [])
            per_view = share(k[b], [counts[v] for v in mine])
            for v, kv in zip(mine, per_view):
                if kv == 0:
                    continue
                units = torch.nonzero(valid[v]).flatten()
                rank = vision.slot[v, units] - offsets[b]
                has_cls = vision.cls is not None
                c = contextual_count(kv, self.config.contextual_fraction)
                dominant, targets, feats = zip_view(vision.scores[v, units], vision.keys[v, units],
                                                    vision.hidden[v, units], kv - c - int(has_cls), c)
                kept[b, rank[dominant]] = True
                kept[b, rank[targets]] = True
                slots += [(b, r) for r in rank[targets].tolist()]
                merged.append(feats)
                if has_cls:  # the first patch left unkept lends the CLS token its place
                    free = rank[~kept[b, rank]][0]
                    kept[b, free] = True
                    slots.append((b, int(free)))
                    merged.append(vision.cls[v : v + 1].float())
            extra = k[b] - int(kept[b].sum())  # LLaVA-NeXT newline tokens, when k exceeds the patches
            if extra > 0:
                spare = torch.nonzero(~kept[b, : n[b]]).flatten()[:extra]
                kept[b, spare] = True
        if slots:
            feats = torch.cat(merged).to(vision.hidden.dtype)
            with torch.no_grad():
                projected = vision.project(feats).to(hidden.dtype)
            rows, ranks = zip(*slots)
            hidden[list(rows), list(ranks)] = projected
        return PruneResult(kept=kept, hidden=hidden)
