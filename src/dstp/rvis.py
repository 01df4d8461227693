"""RVIS analysis (DESIGN §6): where the model looks while it writes its answer, as functions (its plots:
`dstp.lab.bench.rvis_plots`; the `dstp analyze` command: `dstp.lab.cli.analyze`).

Relevance r_l over all N visual tokens at decoding step l is the head-mean attention of the token fed at step l
(step 0: the last prompt token) over the visual tokens, from an unpruned run. The shift curve is cos(r_0, r_l);
an RVIS event is a dip of it at least 0.1 deep whose lowest similarity is below 0.7 (`dips`, `events`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dstp.engine.engine import Engine
from dstp.engine.prune_context import visual_layout
from dstp.models.base import PreparedInputs

EVENT_THRESHOLD = 0.7
EVENT_PROMINENCE = 0.1  # how deep a dip must be to count (DESIGN §6)


def extend_prepared(adapter, prepared: PreparedInputs, tokens: torch.Tensor) -> PreparedInputs:
    """The prompt followed by generated `tokens` [B, n], as one prefill input (positions continue)."""
    B, n = tokens.shape
    emb = adapter.embed_tokens(tokens.to(prepared.inputs_embeds.device))
    steps = torch.arange(n, device=emb.device)
    new_pos = prepared.next_position[:, None] + steps
    pos = prepared.position_ids
    new_pos = new_pos[None].expand(3, -1, -1) if pos.dim() == 3 else new_pos
    ones = torch.ones(B, n, dtype=torch.bool, device=emb.device)
    extras = dict(prepared.extras)
    if "deepstack" in extras:  # generated tokens get no DeepStack features
        ds = extras["deepstack"]
        extras["deepstack"] = torch.cat([ds, ds.new_zeros(*ds.shape[:2], n, ds.shape[-1])], 2)
    return PreparedInputs(
        inputs_embeds=torch.cat([prepared.inputs_embeds, emb], 1),
        attention_mask=torch.cat([prepared.attention_mask, ones], 1),
        position_ids=torch.cat([pos, new_pos], -1),
        next_position=prepared.next_position + n,
        visual_mask=torch.cat([prepared.visual_mask, ~ones], 1),
        vision_scores=prepared.vision_scores, extras=extras)


@torch.no_grad()
def relevance(engine: Engine, prepared: PreparedInputs, tokens: torch.Tensor, layers: list[int] | None = None,
              lengths: list[int] | None = None) -> torch.Tensor:
    """Relevance [B, len(layers), n + 1, Nmax]: row l is the attention of the token fed at decoding step l
    (l = 0: the last prompt token; l >= 1: generated token l-1) over each visual token, head-mean."""
    a = engine.adapter
    layers = list(range(a.n_layers)) if layers is None else layers
    T = prepared.inputs_embeds.shape[1]
    n = tokens.shape[1]
    feed = tokens[:, :-1] if n > 0 else tokens  # the last generated token is never fed back
    ext = extend_prepared(a, prepared, feed)
    state_store, cos, sin, capture = engine.run_prompt(ext, set(layers))
    vpos, vvalid, _ = visual_layout(prepared.visual_mask)
    query_pos = (T - 1 + torch.arange(feed.shape[1] + 1, device=vpos.device)).expand(vpos.shape[0], -1)
    out = []
    for i in layers:
        probs = engine.attention_rows(i, capture[i], query_pos, state_store, cos, sin).mean(1)  # [B, Q, T+n]
        rel = probs.gather(2, vpos[:, None, :].expand(-1, probs.shape[1], -1))
        out.append(rel.masked_fill(~vvalid[:, None, :], 0.0))
    return torch.stack(out, 1)


def shift_curve(r: torch.Tensor) -> torch.Tensor:
    """cos(r_0, r_l) for every step: r [..., S, N] -> [..., S]."""
    return torch.nn.functional.cosine_similarity(r, r[..., :1, :], dim=-1)


def dips(curve, prominence: float = EVENT_PROMINENCE) -> list[tuple[int, int]]:
    """The dips of a shift curve as [start, stop) step ranges. A dip starts where the curve falls `prominence` below
    the highest value since the previous dip (at first: step 0, the prompt's own similarity) and ends before the
    step where it rises `prominence` above the lowest value inside it, or at the end of the answer. Changes
    smaller than `prominence` neither start nor end a dip, so noise on a low plateau is one dip, not many."""
    c = [float(x) for x in curve]
    out, start, peak, low = [], None, c[0] if c else 0.0, math.inf
    for i in range(1, len(c)):
        if start is None:
            if c[i] <= peak - prominence:
                start, low = i, c[i]
            peak = max(peak, c[i])
        elif c[i] >= low + prominence:
            out.append((start, i))
            start, peak = None, c[i]
        else:
            low = min(low, c[i])
    if start is not None:
        out.append((start, len(c)))
    return out


def events(curve, threshold: float = EVENT_THRESHOLD, prominence: float = EVENT_PROMINENCE) -> list[int]:
    """RVIS events: one per dip (see `dips`) whose lowest similarity is below `threshold`, at the dip's first step
    within `prominence` of that lowest value (the bottom of the dip, up to noise)."""
    c = [float(x) for x in curve]
    out = []
    for start, stop in dips(c, prominence):
        low = min(c[start:stop])
        if low < threshold:
            out.append(next(i for i in range(start, stop) if c[i] <= low + prominence))
    return out


def topk_overlap(r: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """Per step, the fraction of top-k(r_l) inside the kept set: r [S, N], kept [N] bool -> [S]."""
    idx = r.topk(k, dim=-1).indices
    return kept[idx].float().mean(-1)


def mass_in(r: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per step, the share of relevance on the kept set: [S]."""
    return (r * kept).sum(-1) / r.sum(-1).clamp(min=1e-12)


@dataclass
class RVISReport:
    layer: int
    curve: list[float]
    events: list[int]
    mass_in_prefill_topk: list[float]
    overlap_with_prefill_topk: list[float]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def report(r_layer: torch.Tensor, layer: int, n_valid: int, retention: float = 0.333) -> RVISReport:
    """RVIS metrics of one sequence at one layer; r_layer [S, Nmax]."""
    r = r_layer[:, :n_valid].float()
    curve = shift_curve(r).tolist()
    k = max(1, math.ceil(retention * n_valid))
    kept = torch.zeros(n_valid, dtype=torch.bool)
    kept[r[0].topk(k).indices] = True
    return RVISReport(layer=layer, curve=curve, events=events(curve), mass_in_prefill_topk=mass_in(r, kept).tolist(),
                      overlap_with_prefill_topk=topk_overlap(r, kept, k).tolist())


def most_focused_layer(r: torch.Tensor) -> int:
    """The layer whose relevance peaks highest on one visual token (mean over steps of the max): where the model
    reads a cell. (Entropy would favour layers that park their attention on a few sink tokens.)"""
    return int(r.float().amax(-1).mean(-1).argmax())


def frame_relevance(r: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Relevance summed over each frame's video tokens: r [..., S, N], frame [N] (each visual token's frame within
    its video, -1 off video: models/video.py) -> [..., S, F], F = the number of frames. Which frame the model reads
    at each step; a row's sum is the attention mass on the video (the rest of the visual mass is on images)."""
    frame = frame[: r.shape[-1]].to(r.device)
    n_frames = int(frame.max()) + 1 if frame.numel() else 0
    onehot = (frame[:, None] == torch.arange(max(n_frames, 0), device=r.device)[None]).to(r.dtype)  # [N, F]
    return r @ onehot
