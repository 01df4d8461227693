"""SparseVLM (Zhang et al., arXiv 2410.04417), the rule of the authors' code (Gumpest/SparseVLMs, v1.5, default
`USE_VERSION=1_0`): text raters, progressive sparsification at three layers, recycling of deleted tokens.

- Raters, once per prompt, from the LLM input embeddings: S = softmax over text of V T^T (V the visual
  embeddings, T the text tokens after the image), averaged over visual tokens; the raters are the text tokens
  whose average exceeds the mean of the averages.
- Three pruning layers, 2, 6 and 15 of 32 (depth-scaled: `depth_scaled_layer`). At each, the layer runs on the
  tokens still present and its own attention (head mean) of the raters on the visual tokens, averaged over the
  raters, ranks them; the top b_s are kept from the next layer on (b_s at most the present count minus one),
  so the prune points are 3, 7 and 16 of 32.
- Budgets: `retention` r names the authors' setting RETAIN_TOKN = r * 576 (33.3% = their 192, 11.1% = 64):
  b = (300, 200, 110), (303, 110, 36), (238, 48, 26), (66, 30, 17) of 576 for 192 / 128 / 96 / 64, a budget
  averaged over the layers (the final stage keeps fewer, plus its cluster tokens).
- Recycling: of the tokens a stage deletes, the top 30% (+1) by the same score are clustered (DPC-kNN: density
  from the int(n/10)+1 nearest neighbours, centres by density x distance to a denser token, every token to its
  nearest centre) into int(n/10)+1 cluster tokens, each the mean of its members' hidden states at the prune
  point; cluster tokens join the visual tokens of the next stages, where they are ranked and recycled again.

Departures (one line each; README "Pruners"):
- every token keeps its original position (the authors' default renumbers the kept tokens 0..n-1);
- a cluster token sits at its centre token's position, in the centre's causal place (the authors insert the
  cluster tokens after the last kept visual token);
- retentions other than the authors' four interpolate their per-stage fractions linearly (1.0 = no pruning;
  below 64/576 the 64 list scales down); for N visual tokens a fraction f keeps ceil(f * N);
- no random noise on the cluster densities (the authors add U(0, 1e-6) to break ties): ties go to the
  higher-scored token;
- rows of a batch are pruned independently (the authors' code runs batch 1); the text after the image is every
  non-visual token after the row's first visual token (all text if none follows), and when no candidate beats
  the mean (a single one) all candidates rate.
With DSTP's `store` source the prefill from the first prune point runs unpruned but carries the first stage's
cluster tokens (as a single-stage merging pruner's merged tokens); later stages' cluster tokens hold their centre
token's K/V from that prefill.
"""
from __future__ import annotations

import torch

from dstp.errors import ConfigError
from dstp.pruners.base import (Pruner, PruneResult, check_shrinking, depth_scaled_layer, stage_points,
                               topk_mask)

AUTHORS_LAYERS = (2, 6, 15)  # of 32: the layers whose attention ranks; pruned from the next one on
AUTHORS_TOKENS = 576  # LLaVA-1.5's visual tokens, what the budgets below are counted in
AUTHORS_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


def stage_fractions(retention: float) -> tuple[float, ...]:
    """Per-stage kept fractions of N for a retention: the authors' list for RETAIN_TOKN = retention * 576 when it
    is one of theirs, else linear between the neighbouring lists (1.0 keeps everything)."""
    if retention >= 1.0:
        return (1.0,) * len(AUTHORS_LAYERS)
    anchors = sorted((t / AUTHORS_TOKENS, tuple(b / AUTHORS_TOKENS for b in bs)) for t, bs in AUTHORS_BUDGETS.items())
    anchors.append((1.0, (1.0,) * len(AUTHORS_LAYERS)))
    for r, fractions in anchors:
        if abs(retention * AUTHORS_TOKENS - r * AUTHORS_TOKENS) < 0.5:
            return fractions
    if retention < anchors[0][0]:
        r0, f0 = anchors[0]
        return tuple(f * retention / r0 for f in f0)
    (r0, f0), (r1, f1) = next((a, b) for a, b in zip(anchors, anchors[1:]) if a[0] <= retention <= b[0])
    t = (retention - r0) / (r1 - r0)
    return tuple(a + t * (b - a) for a, b in zip(f0, f1))


def candidate_raters(prepared, visual_pos: torch.Tensor):
    """Positions [B, Q] of each row's rater candidates, the text after its first visual token (padded with the
    last token), and their validity."""
    T = prepared.attention_mask.shape[1]
    text = prepared.attention_mask & ~prepared.visual_mask
    after = text & (torch.arange(T, device=text.device)[None, :] > visual_pos[:, :1])
    cand = torch.where(after.any(-1, keepdim=True), after, text)
    n = cand.sum(-1)
    Q = max(int(n.max()), 1)
    pos = torch.argsort((~cand).to(torch.int8), dim=-1, stable=True)[:, :Q]
    valid = torch.arange(Q, device=text.device)[None, :] < n[:, None]
    return torch.where(valid, pos, T - 1), valid


def select_raters(embeds: torch.Tensor, visual_pos, visual_valid, cand_pos, cand_valid) -> torch.Tensor:
    """Bool [B, Q]: the candidates whose softmax similarity to the visual embeddings, averaged over the visual
    tokens, exceeds the mean over candidates."""
    D = embeds.shape[-1]
    v = embeds.gather(1, visual_pos[..., None].expand(-1, -1, D)).float()
    t = embeds.gather(1, cand_pos[..., None].expand(-1, -1, D)).float()
    sim = torch.softmax((v @ t.transpose(1, 2)).masked_fill(~cand_valid[:, None, :], float("-inf")), dim=-1)
    sim = sim.nan_to_num(0.0) * visual_valid[..., None]
    relevance = sim.sum(1) / visual_valid.sum(-1, keepdim=True).clamp(min=1)  # [B, Q]
    mean = (relevance * cand_valid).sum(-1, keepdim=True) / cand_valid.sum(-1, keepdim=True).clamp(min=1)
    raters = cand_valid & (relevance > mean)
    return torch.where(raters.any(-1, keepdim=True), raters, cand_valid)


def recycle(score: torch.Tensor, hidden: torch.Tensor, deleted: torch.Tensor):
    """The authors' token recycling, per row: the top 30% (+1) of the deleted tokens by score, clustered by
    DPC-kNN into int(n / 10) + 1 clusters. Returns (centres [B, N] bool, hidden [B, N, D] with each centre's
    cluster mean, sum of members / (count + 1e-6) as the authors weigh it)."""
    B, N, D = hidden.shape
    n_del = deleted.sum(-1)
    n_rec = torch.where(n_del > 0, (n_del.double() * 0.3).floor().long() + 1, 0)
    n_clu = torch.where(n_rec > 0, n_rec // 10 + 1, 0)
    m = int(n_rec.max()) if B else 0
    centres = torch.zeros(B, N, dtype=torch.bool, device=hidden.device)
    if m == 0:
        return centres, hidden
    # the recycled tokens, best score first (the authors' order)
    s = score.float().masked_fill(~topk_mask(score, deleted, n_rec), float("-inf"))
    member = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :m]  # [B, m] visual ranks
    valid = torch.arange(m, device=hidden.device)[None] < n_rec[:, None]
    x = hidden.gather(1, member[..., None].expand(-1, -1, D)).float()
    pair = valid[:, :, None] & valid[:, None, :]
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / D ** 0.5
    # density from the n_clu nearest (the token itself included)
    nearest = torch.sort(dist.masked_fill(~pair, float("inf")), dim=-1).values
    within = torch.arange(m, device=hidden.device)[None, None] < n_clu[:, None, None]
    density = torch.exp(-(nearest.masked_fill(~within, 0.0) ** 2).sum(-1) / n_clu[:, None].clamp(min=1))
    # distance to the nearest denser token (the whole row's largest distance for the densest)
    dist_max = dist.masked_fill(~pair, float("-inf")).flatten(1).max(-1).values[:, None, None]
    # j is denser than i: higher density, or equal density and a higher score (members are in score order)
    earlier = torch.ones(m, m, dtype=torch.bool, device=hidden.device).tril(-1)  # [i, j]: j < i
    denser = ((density[:, None, :] > density[:, :, None]) | ((density[:, None, :] == density[:, :, None]) & earlier)) \
        & valid[:, None, :]
    delta = torch.where(denser, dist, dist_max).min(-1).values
    centre_score = (delta * density).masked_fill(~valid, float("-inf"))
    C = int(n_clu.max())
    centre = torch.sort(centre_score, dim=-1, descending=True, stable=True).indices[:, :C]  # [B, C] into members
    cvalid = torch.arange(C, device=hidden.device)[None] < n_clu[:, None]
    to_centre = dist.gather(1, centre[..., None].expand(-1, -1, m)).masked_fill(~cvalid[..., None], float("inf"))
    assign = to_centre.argmin(1)  # [B, m]: the nearest centre (first in score order on ties)
    # every centre belongs to its own cluster
    own = torch.arange(C, device=hidden.device).expand(B, C)
    assign = torch.cat([assign, assign.new_zeros(B, 1)], 1).scatter(1, torch.where(cvalid, centre, m), own)[:, :m]
    slot = torch.where(valid, assign, C)  # padding members go to a spare cluster
    count = torch.zeros(B, C + 1, device=hidden.device).scatter_add_(1, slot, valid.float())
    weight = (1.0 / (count + 1e-6)).gather(1, slot)  # [B, m]: 1 / (members of its cluster + 1e-6)
    merged = torch.zeros(B, C + 1, D, device=hidden.device).scatter_add_(
        1, slot[..., None].expand(-1, -1, D), x * weight[..., None])[:, :C]
    at = torch.where(cvalid, member.gather(1, centre), N)  # [B, C] visual ranks of the centres (N: none)
    centres = torch.zeros(B, N + 1, dtype=torch.bool, device=hidden.device).scatter_(1, at, True)[:, :N]
    out = torch.cat([hidden, hidden.new_zeros(B, 1, D)], 1)
    out = out.scatter(1, at[..., None].expand(-1, -1, D), merged.to(hidden.dtype))[:, :N]
    return centres, out


class SparseVLM(Pruner):
    name = "sparsevlm"
    default_layer = 3  # the first prune point, after the authors' pruning layer 2 of 32
    needs = ("attention", "embeddings")
    multi_stage = True

    def __init__(self, config, n_layers: int, layers: tuple[int, ...] | None = None,
                 fractions: tuple[float, ...] | None = None):
        """`layers`: prune points (the attention of the layer before each ranks); `fractions`: per-stage kept
        fractions of N instead of the authors' budgets for the retention (must shrink)."""
        super().__init__(config, n_layers)
        points = layers or [depth_scaled_layer(n_layers, layer) + 1 for layer in AUTHORS_LAYERS]
        first = config.layer if layers is None else None
        self.stage_layers = stage_points(n_layers, points, first, self.name)
        self.layer = self.stage_layers[0]
        self.fractions = check_shrinking(fractions, "stage fractions", self.name) if fractions else None
        if self.fractions and len(self.fractions) != len(self.stage_layers):
            raise ConfigError(f"{self.name}: {len(self.fractions)} stage fractions for {len(self.stage_layers)} "
                              f"stages")

    def select(self, ctx) -> PruneResult:
        before = ctx.kept_before & ctx.visual_valid
        fractions = self.fractions or stage_fractions(self.config.retention)
        if fractions[ctx.stage] >= 1.0:
            return PruneResult(kept=before)
        cand, cvalid = candidate_raters(ctx.prepared, ctx.visual_pos)
        raters = select_raters(ctx.prepared.inputs_embeds, ctx.visual_pos, ctx.visual_valid, cand, cvalid)
        att = ctx.visual_attention(cand)  # [B, Q, N] head mean, this stage's layer P-1, tokens present
        score = (att * raters[..., None]).sum(1) / raters.sum(-1, keepdim=True).clamp(min=1)
        k = torch.minimum(self.budget(ctx, fractions[ctx.stage]), before.sum(-1) - 1).clamp(min=0)
        keep = topk_mask(score, before, k)
        centres, hidden = recycle(score, ctx.visual_hidden(), before & ~keep)
        return PruneResult(kept=keep | centres, hidden=hidden)
