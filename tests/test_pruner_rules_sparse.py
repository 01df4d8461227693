"""SparseVLM and PyramidDrop against an independent re-derivation of the authors' rules (their papers and code:
Gumpest/SparseVLMs v1.5, Cooperx521/PyramidDrop), with dstp's stated departures (original positions, cluster
tokens at their centre's position, retention -> budgets).

The re-derivation runs each batch row alone, as the authors' code does: the row's own tokens without padding,
physically shortened at every pruning layer, transformers' own eager attention weights (a hook on the layer's
attention module), plain per-row torch for raters, ranking, budgets and the DPC-kNN clustering. It shares nothing
with dstp but the adapter's `prepare` (the input embeddings). Kept sets are compared per stage, exactly; the
recycled cluster tokens' hidden states to float rounding."""
import copy
import math

import pytest
import torch

from dstp.config import PruneConfig
from dstp.engine.engine import Engine
from dstp.errors import ConfigError
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.pruners.pyramiddrop import PyramidDrop
from dstp.pruners.sparsevlm import SparseVLM
from dstp.lab.bench import tiny_models as tm

LAYERS = 8
SEEDS = (0, 1, 2)
RETENTIONS = (0.666, 0.333, 0.111)
BATCHES = {
    "llava": (tm.tiny_llava, lambda seed: tm.llava_batch([3, 7, 1], seed=seed)),
    "qwen2_5_vl": (tm.tiny_qwen2_5_vl, lambda seed: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6], seed=seed)),
}
# the authors' score.py: tokens kept after layers 2, 6, 15 for RETAIN_TOKN = 192, 128, 96, 64 (of 576)
SPARSEVLM_LISTS = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}


@pytest.fixture(scope="module", params=[(f, s) for f in sorted(BATCHES) for s in SEEDS], ids=str)
def case(request):
    family, seed = request.param
    make, batch = BATCHES[family]
    model = make(seed=seed, layers=LAYERS)
    adapter = adapter_for_model(model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return family, adapter, adapter.prepare(batch(seed)), eager.model.language_model


# -- the re-derivation, one row at a time ------------------------------------------------------------------------
def run_layer(lm, i, h, pos):
    """Layer i of the eager language model on one unpadded row h [1, n, D] at position ids `pos`; returns its
    output and its attention probabilities [H, n, n]."""
    n = h.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    seen = []
    hook = lm.layers[i].self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    try:
        out = lm.layers[i](h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos))
    finally:
        hook.remove()
    return (out[0] if isinstance(out, tuple) else out), seen[0][0]


def row_inputs(prepared, b):
    keep = prepared.attention_mask[b]
    seq = torch.nonzero(keep).flatten()  # original indices of the row's tokens
    pos = prepared.position_ids[..., b:b + 1, :]
    vis = torch.nonzero(prepared.visual_mask[b]).flatten().tolist()
    return seq, pos, vis


def dpc_knn(x, n_clusters):
    """Cluster centres (indices into x, best first) and each token's cluster index, as the authors' recycling
    clusters: density from the n_clusters nearest, distance to a denser token, nearest centre."""
    n, d = x.shape
    dist = torch.stack([torch.stack([(x[i] - x[j]).pow(2).sum().sqrt() for j in range(n)]) for i in range(n)])
    dist = dist / math.sqrt(d)
    density = torch.stack([(-(dist[i].sort().values[:n_clusters] ** 2).mean()).exp() for i in range(n)])
    far = dist.max()
    # ties go to the higher-scored token (x is in score order), where the authors add U(0, 1e-6) noise
    denser = lambda j, i: density[j] > density[i] or (density[j] == density[i] and j < i)  # noqa: E731
    delta = torch.stack([min([dist[i, j] for j in range(n) if denser(j, i)], default=far) for i in range(n)])
    score = delta * density
    centres = sorted(range(n), key=lambda i: (-float(score[i]), i))[:n_clusters]
    assign = [min(range(n_clusters), key=lambda c: (float(dist[centres[c], j]), c)) for j in range(n)]
    for c, i in enumerate(centres):
        assign[i] = c
    return centres, assign


def sparsevlm_fractions(r):
    tokens = {t / 576: [b / 576 for b in bs] for t, bs in SPARSEVLM_LISTS.items()}
    for t, f in tokens.items():
        if abs(r * 576 - t * 576) < 0.5:
            return f
    lo = max(t for t in list(tokens) + [1.0] if t <= r)
    hi = min(t for t in list(tokens) + [1.0] if t >= r)
    flo, fhi = tokens.get(lo, [1.0] * 3), tokens.get(hi, [1.0] * 3)
    return [a + (r - lo) / (hi - lo) * (c - a) for a, c in zip(flo, fhi)]


@torch.no_grad()
def sparsevlm_row(lm, prepared, b, retention, read_layers):
    """Per stage: (kept visual ranks incl. cluster tokens, {centre rank: merged hidden})."""
    seq, pos, vis = row_inputs(prepared, b)
    N = len(vis)
    rank = {p: i for i, p in enumerate(vis)}
    emb = prepared.inputs_embeds[b]
    # raters: the text after the image, by softmax(V T^T) over text, averaged over visual tokens, above the mean
    after = [int(p) for p in seq if p > vis[-1]]
    m = torch.softmax(emb[vis] @ emb[after].T, dim=1).mean(0)
    raters = [p for p, v in zip(after, m) if v > m.mean()] or after
    fractions = sparsevlm_fractions(retention)
    present = seq.tolist()  # original indices of the tokens still in the row, in order
    h = emb[seq][None]
    stages = []
    for i in range(LAYERS):
        h, att = run_layer(lm, i, h, pos[..., present])
        if i not in read_layers:
            continue
        s = read_layers.index(i)
        att = att.mean(0)  # heads
        idx = {p: j for j, p in enumerate(present)}
        cur_vis = [p for p in present if p in rank]
        score = torch.stack([att[[idx[q] for q in raters]][:, idx[p]].mean() for p in cur_vis])
        k = min(math.ceil(N * fractions[s] - 1e-9), len(cur_vis) - 1)
        order = sorted(range(len(cur_vis)), key=lambda j: (-float(score[j]), j))
        keep = sorted(cur_vis[j] for j in order[:k])
        deleted = [j for j in order[k:]]  # best score first
        merged = {}
        if deleted:
            recycled = deleted[: int(len(deleted) * 0.3) + 1]
            x = torch.stack([h[0, idx[cur_vis[j]]] for j in recycled])
            n_clusters = int(len(recycled) / 10) + 1
            centres, assign = dpc_knn(x, n_clusters)
            for c, centre in enumerate(centres):
                members = [j for j, a in enumerate(assign) if a == c]
                w = 1.0 / (len(members) + 1e-6)
                merged[cur_vis[recycled[centre]]] = sum(x[j] * w for j in members)
        kept = sorted(keep + list(merged))
        stages.append(([rank[p] for p in kept], {rank[p]: v for p, v in merged.items()}))
        new_present = [p for p in present if p not in rank or p in kept]
        h = torch.stack([merged.get(p, h[0, idx[p]]) for p in new_present])[None]
        present = new_present
    return stages


@torch.no_grad()
def pyramiddrop_row(lm, prepared, b, retention, points):
    seq, pos, vis = row_inputs(prepared, b)
    N = len(vis)
    rank = {p: i for i, p in enumerate(vis)}
    lam = retention ** (1 / 3)
    ratios = [lam, lam ** 2, retention]
    present = seq.tolist()
    h = prepared.inputs_embeds[b][seq][None]
    stages = []
    for i in range(LAYERS):
        if i in points:
            s = points.index(i)
            _, att = run_layer(lm, i, h, pos[..., present])  # layer i's own attention on its input
            last = att.mean(0)[-1]  # the last instruction token's row, head mean
            cur = [(j, p) for j, p in enumerate(present) if p in rank]
            k = min(math.ceil(N * ratios[s] - 1e-9), len(cur))
            best = sorted(cur, key=lambda jp: (-float(last[jp[0]]), jp[0]))[:k]
            kept = {p for _, p in best}
            stages.append(sorted(rank[p] for p in kept))
            sel = [j for j, p in enumerate(present) if p not in rank or p in kept]
            h, present = h[:, sel], [present[j] for j in sel]
        h, _ = run_layer(lm, i, h, pos[..., present])
    return stages


class Recorder:
    """The pruner as the engine sees it, keeping what each stage returned."""

    def __init__(self, pruner):
        self.pruner, self.stage_layers, self.layer, self.results = pruner, pruner.stage_layers, pruner.layer, []

    def select(self, ctx):
        result = self.pruner.select(ctx)
        self.results.append((result, ctx.kept_before.clone()))
        return result


def engine_stages(adapter, prepared, method, retention):
    rec = Recorder(get_pruner(PruneConfig(method, retention), adapter.n_layers))
    state, _, _, _ = Engine(adapter).prefill(prepared, 2, pruner=rec)
    return rec, state


@pytest.mark.parametrize("retention", RETENTIONS)
def test_sparsevlm_is_the_authors_rule(case, retention):
    family, adapter, prepared, lm = case
    rec, state = engine_stages(adapter, prepared, "sparsevlm", retention)
    read_layers = [p - 1 for p in rec.stage_layers]
    assert rec.stage_layers == (2, 3, 5)  # 2/6/15 of 32 -> 1/2/4 of 8 (the layers read), pruned from the next
    for b in range(prepared.inputs_embeds.shape[0]):
        want = sparsevlm_row(lm, prepared, b, retention, read_layers)
        for s, (kept, merged) in enumerate(want):
            got = torch.nonzero(state.stages[s].kept[b]).flatten().tolist()
            assert got == kept, (b, s)
            result, _ = rec.results[s]
            for r, value in merged.items():
                assert (result.hidden[b, r] - value).abs().max() < 1e-5, (b, s, r)
        assert len(want) == 3 and len(want[-1][1]) >= 1  # every stage recycled


@pytest.mark.parametrize("retention", RETENTIONS)
def test_pyramiddrop_is_the_authors_rule(case, retention):
    family, adapter, prepared, lm = case
    rec, state = engine_stages(adapter, prepared, "pyramiddrop", retention)
    assert rec.stage_layers == (2, 4, 6)  # 8/16/24 of 32
    for b in range(prepared.inputs_embeds.shape[0]):
        want = pyramiddrop_row(lm, prepared, b, retention, list(rec.stage_layers))
        got = [torch.nonzero(stage.kept[b]).flatten().tolist() for stage in state.stages]
        assert got == want, b
    n = prepared.n_visual
    assert state.kept.sum(-1).tolist() == [math.ceil(x * retention - 1e-9) for x in n.tolist()]


def test_budgets_and_schedules():
    # the authors' lists exactly at their four settings; 1.0 keeps everything
    from dstp.pruners.sparsevlm import stage_fractions

    assert [round(f * 576) for f in stage_fractions(0.333)] == [300, 200, 110]
    assert [round(f * 576) for f in stage_fractions(0.111)] == [66, 30, 17]
    assert stage_fractions(1.0) == (1.0, 1.0, 1.0)
    assert PyramidDrop(PruneConfig("pyramiddrop", 0.125), 32).stage_layers == (8, 16, 24)
    from dstp.pruners.pyramiddrop import stage_ratios

    assert stage_ratios(0.125) == (0.5, 0.25, 0.125)  # the authors' lambda = 0.5
    assert SparseVLM(PruneConfig("sparsevlm", 0.333), 32).stage_layers == (3, 7, 16)
    assert SparseVLM(PruneConfig("sparsevlm", 0.333), 16).stage_layers == (2, 4, 9)
    assert SparseVLM(PruneConfig("sparsevlm", 0.333), 4).stage_layers == (1, 2, 3)  # shallow: neighbours
    assert SparseVLM(PruneConfig("sparsevlm", 0.333, layer=4), 32).stage_layers == (4, 7, 16)


def test_stage_budgets_that_do_not_shrink_are_config_errors():
    cfg = PruneConfig("pyramiddrop", 0.333)
    with pytest.raises(ConfigError, match="shrink"):
        PyramidDrop(cfg, 32, ratios=(0.5, 0.5, 0.25))
    with pytest.raises(ConfigError, match="shrink"):
        SparseVLM(PruneConfig("sparsevlm", 0.333), 32, fractions=(0.3, 0.4, 0.1))
    with pytest.raises(ConfigError, match="do not fit"):
        PyramidDrop(cfg, 3)
    with pytest.raises(ConfigError, match="do not fit"):
        PyramidDrop(PruneConfig("pyramiddrop", 0.333, layer=31), 32)


def test_recycling_with_two_clusters_makes_one_centre_of_a_tied_pair():
    """RETAIN_TOKN=64 of 576: the second stage deletes 52 tokens, recycles 16 of them into 2 clusters. With 2
    clusters a token's density comes from itself and its nearest neighbour, so the densest mutually-nearest pair
    ties exactly; the tie goes to the higher-scored token, so that pair gives one centre, not both."""
    from dstp.pruners.sparsevlm import recycle

    g = torch.Generator().manual_seed(0)
    N, D = 576, 16
    hidden = torch.randn(1, N, D, generator=g)
    score = torch.rand(1, N, generator=g)
    deleted = torch.zeros(1, N, dtype=torch.bool)
    deleted[0, torch.randperm(N, generator=g)[:52]] = True
    centres, _ = recycle(score, hidden, deleted)
    members = torch.sort(score.masked_fill(~deleted, float("-inf")), descending=True).indices[0, :16]
    want, _ = dpc_knn(hidden[0, members], 2)
    assert sorted(torch.nonzero(centres[0]).flatten().tolist()) == sorted(members[want].tolist())
    x = hidden[0, members]
    dist = torch.cdist(x, x).fill_diagonal_(float("inf"))
    nearest = dist.min(-1)
    i = int(nearest.values.argmin())
    pair = {int(members[i]), int(members[nearest.indices[i]])}  # the densest pair: each the other's nearest
    assert len(pair & set(torch.nonzero(centres[0]).flatten().tolist())) == 1
