"""Prefill pruners: selection properties on synthetic contexts, agreement with transformers' own
attention weights and with direct references, and behaviour inside the engine."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dstp.config import GenerationConfig, PruneConfig
from dstp.engine.engine import Engine
from dstp.engine.prune_context import topk_mask, visual_layout
from dstp.pruners.base import budget
from dstp.errors import ConfigError
from dstp.models.llava import text_positions
from dstp.models.registry import adapter_for_model
from dstp.pruners import PRUNERS, depth_scaled_layer, get_pruner
from dstp.pruners.divprune import max_min_diverse
from dstp.models.vision import VisionInternals, consecutive_slots, pad_views
from dstp.lab.bench import tiny_models as tm

METHODS = sorted(m for m in PRUNERS if not PRUNERS[m].video_only)  # evs: tests/test_evs.py
SINGLE_STAGE = [m for m in METHODS if not PRUNERS[m].multi_stage]  # multi-stage rules: test_pruner_rules_sparse.py
D = 8


# -- synthetic contexts ------------------------------------------------------------------------------
def make_row(n, before, after, seed):
    """One row's data, drawn from its own seed: token kinds, embeddings, head-mean attention, scores."""
    g = torch.Generator().manual_seed(seed)
    T = 1 + before + n + after
    visual = torch.zeros(T, dtype=torch.bool)
    visual[1 + before:1 + before + n] = True
    logits = torch.randn(T, T, generator=g) * 3
    attn = torch.softmax(logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)
    return dict(visual=visual, hidden=torch.randn(T, D, generator=g), attn=attn,
                scores=torch.rand(n, generator=g), relevant=torch.rand(n, generator=g) < 0.3,
                keys=torch.randn(n, 4, generator=g), cls=torch.randn(D, generator=g))


class FakeContext:
    """The PruneContext interface over synthetic rows (left-padded, each row independent)."""

    def __init__(self, rows, retention, seed=0):
        B, T = len(rows), max(len(r["visual"]) for r in rows)
        self.engine, self.layer = None, 2
        self.hidden = torch.zeros(B, T, D)
        self._attn = torch.zeros(B, T, T)
        visual, valid = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
        for b, r in enumerate(rows):
            t = len(r["visual"])
            visual[b, T - t:], valid[b, T - t:] = r["visual"], True
            self.hidden[b, T - t:] = r["hidden"]
            self._attn[b, T - t:, T - t:] = r["attn"]
        self.visual_pos, self.visual_valid, self.n_visual = visual_layout(visual)
        N = self.visual_pos.shape[1]
        pad = lambda key, dtype: torch.stack([F.pad(r[key].to(dtype), (0, N - len(r[key]))) for r in rows])
        counts = [len(r["scores"]) for r in rows]
        vision = VisionInternals(hidden=pad_views([r["hidden"][r["visual"]] for r in rows]),
                                 keys=pad_views([r["keys"] for r in rows]), scores=pad_views([r["scores"] for r in rows]),
                                 slot=consecutive_slots(counts, "cpu"), project=lambda x: x,
                                 cls=torch.stack([r["cls"] for r in rows]))
        self.prepared = SimpleNamespace(attention_mask=valid, visual_mask=visual,
                                        vision_scores=pad("scores", torch.float32), vision=vision)
        self.relevant = pad("relevant", torch.bool)
        self.k = budget(self.n_visual, retention)
        self.generator = torch.Generator().manual_seed(seed)

    batch = property(lambda self: self.hidden.shape[0])
    nmax = property(lambda self: self.visual_pos.shape[1])

    def visual_hidden(self):
        return self.hidden.gather(1, self.visual_pos[..., None].expand(-1, -1, D))

    def visual_attention(self, query_pos):
        a = self._attn.gather(1, query_pos[..., None].expand(-1, -1, self._attn.shape[-1]))
        a = a.gather(2, self.visual_pos[:, None, :].expand(-1, a.shape[1], -1))
        return a.masked_fill(~self.visual_valid[:, None, :], 0.0)

    def last_token_position(self):
        return torch.full((self.batch, 1), self.hidden.shape[1] - 1, dtype=torch.long)


def kept_lists(kept, n):
    return [torch.nonzero(kept[b, : int(n[b])]).flatten().tolist() for b in range(kept.shape[0])]


row_spec = st.tuples(st.integers(1, 24), st.integers(0, 4), st.integers(0, 4), st.integers(0, 10_000))


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(SINGLE_STAGE), rows=st.lists(row_spec, min_size=1, max_size=4),
       others=st.lists(row_spec, min_size=1, max_size=3), retention=st.floats(0.01, 1.0), seed=st.integers(0, 99))
def test_selection_properties(method, rows, others, retention, seed):
    pruner = get_pruner(PruneConfig(method, retention, seed=seed), n_layers=4)

    def run(specs):
        ctx = FakeContext([make_row(*s) for s in specs], retention, seed)
        return ctx, pruner.select(ctx)

    ctx, res = run(rows)
    assert res.kept.shape == (ctx.batch, ctx.nmax) and res.kept.dtype == torch.bool
    assert not (res.kept & ~ctx.visual_valid).any()  # indices in range
    assert torch.equal(res.kept.sum(-1), torch.minimum(ctx.k, ctx.n_visual))  # exactly k, unique
    mine = kept_lists(res.kept, ctx.n_visual)
    assert kept_lists(run(rows)[1].kept, ctx.n_visual) == mine  # deterministic under the seed
    # row 0 keeps the same set whatever the other rows hold (other sizes, contents)
    ctx2, res2 = run([rows[0]] + [(n, b, a, s + 1) for n, b, a, s in others])
    assert kept_lists(res2.kept, ctx2.n_visual)[0] == mine[0]
    if res.hidden is not None:
        assert res.hidden.shape == (ctx.batch, ctx.nmax, D)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), retention=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_divprune_equals_direct_greedy(n, retention, seed):
    x = torch.randn(1, n, D, generator=torch.Generator().manual_seed(seed))
    k = budget(torch.tensor([n]), retention)
    got = torch.nonzero(max_min_diverse(x, torch.ones(1, n, dtype=torch.bool), k)[0]).flatten().tolist()
    v = x[0].double()
    dist = [[1 - float(F.cosine_similarity(v[i], v[j], dim=0)) for j in range(n)] for i in range(n)]
    chosen = [max(range(n), key=lambda i: min([dist[i][j] for j in range(n) if j != i] or [float("inf")]))]
    while len(chosen) < int(k):
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(dist[i][j] for j in chosen)))
    assert got == sorted(chosen)


# -- tiny models ---------------------------------------------------------------------------------------
FAMILIES = {
    "llava": (tm.tiny_llava, lambda: tm.llava_batch([3, 7, 1])),
    "qwen2_5_vl": (tm.tiny_qwen2_5_vl, lambda: tm.qwen_batch([(8, 8), (4, 8), (8, 4)], [3, 1, 6])),
}
# families whose vision scores are checked too (the attention-rule tests above run on FAMILIES)
ALL_FAMILIES = {
    **FAMILIES,
    "qwen3_vl": (tm.tiny_qwen3_vl, lambda: tm.qwen3_vl_batch([(8, 8), (4, 8)], [3, 1])),
    "internvl": (tm.tiny_internvl, lambda: tm.internvl_batch([1, 2], [3, 1])),
    "llava_next": (tm.tiny_llava_next, lambda: tm.llava_next_batch([(30, 55), (60, 40)], [3, 1])),
    "llava_onevision": (tm.tiny_llava_onevision, lambda: tm.llava_onevision_batch([[(30, 55)], [(40, 40), (20, 20)]],
                                                                                  [3, 1])),
    "qwen3_vl_moe": (tm.tiny_qwen3_vl_moe, lambda: tm.qwen3_vl_batch([(8, 8), (4, 8)], [3, 1])),
}


def build_family(name):
    make, batch = ALL_FAMILIES[name]
    model = make()
    adapter = adapter_for_model(model)
    b = batch()
    return SimpleNamespace(name=name, model=model, adapter=adapter, batch=b, prepared=adapter.prepare(b))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return build_family(request.param)


@pytest.fixture(scope="module")
def llava_family():
    return build_family("llava")


@pytest.fixture(scope="module")
def qwen_family():
    return build_family("qwen2_5_vl")


def eager_copy(model):
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    return m


def all_relevant(prepared, p=0.25):
    n = prepared.n_visual
    return torch.rand(len(n), int(n.max()), generator=torch.Generator().manual_seed(0)) < p


@pytest.fixture(scope="module")
def eager_attentions(family):
    """transformers' own eager attention weights of every LLM layer, [B, H, T, T] each."""
    b = family.batch
    kwargs = {"position_ids": text_positions(b["attention_mask"].bool())} if family.name == "llava" else {}
    with torch.no_grad():
        return eager_copy(family.model)(**b, output_attentions=True, **kwargs).attentions


def engine_kept(family, method, K, retention=0.3):
    pruner = get_pruner(PruneConfig(method, retention, layer=K), family.adapter.n_layers)
    state, _, _, _ = Engine(family.adapter).prefill(family.prepared, 2, pruner=pruner)
    return state.kept


@pytest.mark.parametrize("K", [1, 2])
def test_fastv_matches_transformers_eager_attention(family, eager_attentions, K):
    att = eager_attentions[K - 1][:, :, -1].mean(1)  # [B, T]: last prompt token, head mean
    pos, valid, n = visual_layout(family.prepared.visual_mask)
    expect = topk_mask(att.gather(1, pos), valid, budget(n, 0.3))
    assert torch.equal(engine_kept(family, "fastv", K), expect)


def test_llava_cls_attention_matches_clip_eager(llava_family):
    family = llava_family
    tower = eager_copy(family.model).model.vision_tower
    with torch.no_grad():
        out = tower(family.batch["pixel_values"], output_attentions=True)
    layer = family.model.config.vision_feature_layer  # hidden_states[-2] is the output of attentions[-2]'s layer
    expect = out.attentions[layer].mean(1)[:, 0, 1:]
    assert torch.allclose(family.prepared.vision_scores, expect, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_received_attention_matches_eager(name, qwen_family, monkeypatch):
    import importlib

    family = qwen_family if name == "qwen2_5_vl" else build_family(name)
    mq = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    seen, original = [], mq.eager_attention_forward

    def record(*args, **kwargs):
        out, weights = original(*args, **kwargs)
        seen.append(weights)
        return out, weights

    monkeypatch.setattr(mq, "eager_attention_forward", record)
    model = eager_copy(family.model)
    grid = family.batch["image_grid_thw"]
    with torch.no_grad():
        model.model.get_image_features(family.batch["pixel_values"], grid)
    last = seen[-len(grid):]  # the last block attends over each whole image (Qwen2.5-VL: fullatt_block_indexes)
    expect = torch.cat([w[0].mean((0, 1)) for w in last]).view(-1, 4).mean(-1)
    if name == "qwen2_5_vl":  # its ViT runs in window order
        expect = expect[torch.argsort(family.adapter.window_index(grid))]
    n = family.prepared.n_visual
    flat = torch.cat([family.prepared.vision_scores[b, : int(n[b])] for b in range(len(n))])
    assert torch.allclose(flat, expect, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_retention_one_equals_unpruned(family, method):
    engine, prepared, cfg = Engine(family.adapter), family.prepared, GenerationConfig(max_new_tokens=6)
    base = engine.generate(prepared, cfg)
    pruner = get_pruner(PruneConfig(method, 1.0), family.adapter.n_layers)
    out = engine.generate(prepared, cfg, pruner=pruner, relevant=all_relevant(prepared))
    assert torch.equal(out.tokens, base.tokens)
    assert out.trace.kept == [list(range(int(n))) for n in prepared.n_visual]


# sparsevlm's final set is the authors' last-stage budget plus its cluster tokens (test_pruner_rules_sparse.py)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "sparsevlm"])
def test_pruned_generation_attends_k_visual_tokens(family, method):
    engine, prepared = Engine(family.adapter), family.prepared
    pruner = get_pruner(PruneConfig(method, 0.3, seed=1), family.adapter.n_layers)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=3), pruner=pruner,
                          relevant=all_relevant(prepared))
    k = budget(prepared.n_visual, 0.3)
    assert out.trace.steps[0].visual_attended.tolist() == k.tolist()
    assert [len(kept) for kept in out.trace.kept] == k.tolist()


@pytest.mark.parametrize("name", ["qwen3_vl", "internvl", "llava_next", "llava_onevision", "qwen3_vl_moe"])
def test_visionzip_runs_on_the_other_families(name):
    family = build_family(name)
    engine, prepared = Engine(family.adapter), family.prepared
    pruner = get_pruner(PruneConfig("visionzip", 0.3), family.adapter.n_layers)
    out = engine.generate(prepared, GenerationConfig(max_new_tokens=3), pruner=pruner)
    assert out.trace.steps[0].visual_attended.tolist() == budget(prepared.n_visual, 0.3).tolist()


@pytest.mark.parametrize("name", sorted(ALL_FAMILIES))
def test_vision_scores_are_computed_only_when_asked(name):
    family = build_family(name)
    lean = family.adapter.prepare(family.batch, vision_scores=False)
    assert lean.vision_scores is None and lean.vision is None
    assert family.prepared.vision_scores is not None and family.prepared.vision is not None
    assert torch.equal(lean.inputs_embeds, family.prepared.inputs_embeds)
    pruner = get_pruner(PruneConfig("visionzip", 0.3), family.adapter.n_layers)
    with pytest.raises(ConfigError, match="visionzip needs the vision encoder's internals .*vision_scores=True"):
        Engine(family.adapter).generate(lean, GenerationConfig(max_new_tokens=2), pruner=pruner)


# -- configuration errors ------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="unknown pruning method 'nope'.*divprune.*fastv"):
        get_pruner(PruneConfig("nope", 0.5), 4)
    with pytest.raises(ConfigError, match="outside the model"):
        get_pruner(PruneConfig("random", 0.5, layer=5), 4)
    for method in ("fastv", "sparsevlm"):
        with pytest.raises(ConfigError, match=f"{method} needs attention"):
            get_pruner(PruneConfig(method, 0.5, layer=0), 4)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="retention"):
            PruneConfig("fastv", bad)
    # the default K is FastV's K=2 of 32 layers scaled to the model's depth
    assert [get_pruner(PruneConfig("fastv", 0.5), n).layer for n in (4, 16, 28, 32, 64)] == [1, 1, 2, 2, 4]
    assert get_pruner(PruneConfig("sparsevlm", 0.5), 32).layer == 3  # after the authors' first pruning layer, 2
    assert get_pruner(PruneConfig("visionzip", 0.5), 4).layer == 0


def test_missing_inputs_name_method_and_thing():
    ctx = FakeContext([make_row(9, 1, 2, 0)], 0.5)
    ctx.prepared.vision = None
    with pytest.raises(ConfigError, match="visionzip needs the vision encoder's internals .*vision_scores=True"):
        get_pruner(PruneConfig("visionzip", 0.5), 4).select(ctx)
    # a family whose adapter cannot provide them: one line naming the method and the family
    ctx.engine = SimpleNamespace(adapter=SimpleNamespace(family="somefamily", vision_internals=False))
    with pytest.raises(ConfigError, match="^visionzip needs .* which the somefamily family cannot provide$"):
        get_pruner(PruneConfig("visionzip", 0.5), 4).select(ctx)
    with pytest.raises(ConfigError, match="visionzip .* runs before the LLM"):
        get_pruner(PruneConfig("visionzip", 0.5, layer=2), 4)
    ctx.relevant = None
    with pytest.raises(ConfigError, match="oracle needs ctx.relevant"):
        get_pruner(PruneConfig("oracle", 0.5), 4).select(ctx)


def test_random_depends_on_seed():
    rows = [make_row(24, 1, 2, 0), make_row(17, 0, 3, 1)]
    pick = lambda seed: get_pruner(PruneConfig("random", 0.25, seed=seed), 4).select(FakeContext(rows, 0.25, seed)).kept
    assert torch.equal(pick(3), pick(3)) and not torch.equal(pick(3), pick(4))


def test_depth_scaled_layer_keeps_fastv_fraction():
    # K=2 of 32 layers is 1/16 of depth: real 24-40-layer models keep K=2, ShiftBench's 16 layers get K=1
    assert [depth_scaled_layer(n) for n in (16, 24, 28, 32, 36, 40, 64)] == [1, 2, 2, 2, 2, 2, 4]
    assert depth_scaled_layer(6) == 1  # never 0: that would be a pruner before the LLM
    with pytest.raises(ConfigError, match="n_layers must be >= 1"):
        depth_scaled_layer(0)


def test_internvl_cls_attention_matches_internvit_eager():
    family = build_family("internvl")
    model = eager_copy(family.model)
    with torch.no_grad():
        out = model.model.vision_tower(family.batch["pixel_values"], output_attentions=True)
    cls = out.attentions[-1].mean(1)[:, 0, 1:]  # vision_feature_layer -1: the last layer, CLS row, patches
    side = int(cls.shape[1] ** 0.5)
    # pixel shuffle 0.5 folds each 2x2 block of patches into one LLM token, row-major over the blocks
    blocks = cls.view(-1, side // 2, 2, side // 2, 2).permute(0, 1, 3, 2, 4).reshape(cls.shape[0], -1, 4)
    expect = blocks.mean(-1).flatten()
    n = family.prepared.n_visual
    flat = torch.cat([family.prepared.vision_scores[b, : int(n[b])] for b in range(len(n))])
    assert torch.allclose(flat, expect, atol=1e-6)


def test_llava_next_scores_follow_the_anyres_layout():
    family = build_family("llava_next")
    model = eager_copy(family.model)
    pixels, sizes = family.batch["pixel_values"], family.batch["image_sizes"]
    with torch.no_grad():
        out = model.model.vision_tower(pixels.flatten(0, 1), output_attentions=True)
    cls = out.attentions[-2].mean(1)[:, 0, 1:].view(pixels.shape[0], pixels.shape[1], -1)  # feature layer -2
    n, scores = family.prepared.n_visual, family.prepared.vision_scores
    # the pinpoint that keeps most of each image: 30x60 for 30x55 (1 x 2 crops), 60x60 for 60x40 (2 x 2 crops)
    crops = {(30, 55): (1, 2), (60, 40): (2, 2)}
    for b, size in enumerate(sizes.tolist()):
        row = scores[b, : int(n[b])]
        assert torch.allclose(row[:25], cls[b, 0], atol=1e-6)  # the base view comes first, whole
        rows, cols = crops[tuple(size)]
        grid = cls[b, 1:1 + rows * cols].view(rows, cols, 5, 5).permute(0, 2, 1, 3).reshape(5 * rows, 5 * cols)
        crop_part = row[25:]
        newline = crop_part == 0  # one newline token (score 0) ends every row of the unpadded crop grid
        lines = crop_part.tensor_split(torch.nonzero(newline).flatten().add(1).tolist())[:-1]
        kept = [line[:-1] for line in lines]
        assert len({len(line) for line in kept}) == 1
        # unpadding trims whole rows (tall) or columns (wide) symmetrically; what is left is a centred window
        h, w = len(kept), len(kept[0])
        top, left = (grid.shape[0] - h) // 2, (grid.shape[1] - w) // 2
        assert torch.allclose(torch.stack(kept), grid[top:top + h, left:left + w], atol=1e-6)


def test_llava_next_without_image_sizes_is_a_clear_error():
    from dstp.errors import InputError

    family = build_family("llava_next")
    batch = {k: v for k, v in family.batch.items() if k != "image_sizes"}
    with pytest.raises(InputError, match="llava_next inputs need image_sizes"):
        family.adapter.prepare(batch)


# -- pre-LLM pruners of issue 15: DSTP on top, the stand-in families -------------------------------------------------
@pytest.mark.parametrize("method", ["visionzip", "cdpruner"])
def test_dstp_composes_with_pre_llm_pruners(llava_family, method):
    from dstp.config import DSTPConfig
    from dstp.shift import ShiftPolicy

    engine, prepared, cfg = Engine(llava_family.adapter), llava_family.prepared, GenerationConfig(max_new_tokens=6)
    pruner = get_pruner(PruneConfig(method, 0.3), llava_family.adapter.n_layers)
    run = lambda shift=None: engine.generate(prepared, cfg, pruner=pruner, return_logits=True,  # noqa: E731
                                             shift=None if shift is None else ShiftPolicy(shift, pruner.layer))
    vanilla, never = run(), run(DSTPConfig(tau=-1.0))
    assert ShiftPolicy(DSTPConfig(), pruner.layer).probe_layer(pruner.layer, llava_family.adapter.n_layers) == 0
    assert torch.equal(vanilla.tokens, never.tokens) and (vanilla.logits - never.logits).abs().max() < 1e-5
    forced = run(DSTPConfig(force_every=1, window=3, variant="random"))
    assert all(bool(s.shift.all()) for s in forced.trace.steps)
    assert all(forced.trace.steps[0].revived)  # every row revived reserve tokens (merged ones kept their embedding)
    assert forced.trace.kept == vanilla.trace.kept


def test_visionzip_and_cdpruner_on_shiftbench():
    """ShiftBench's per-cell front end: VisionZip on its stand-ins (feature norm, features as keys, identity
    projector); CDPruner on the prompt's embeddings after the image."""
    from dstp.lab.shiftbench import generate_samples
    from dstp.lab.shiftbench.processor import ShiftBenchProcessor
    from dstp.lab.shiftbench.train import TrainConfig, build_model

    processor = ShiftBenchProcessor.build()
    model = build_model(TrainConfig(seed=3), processor).eval()
    samples = generate_samples("lookup", 2, seed=5) + generate_samples("walk", 1, seed=5, hops=2)
    adapter = adapter_for_model(model, processor)
    prepared = adapter.prepare(processor(images=[s.image for s in samples], text=[s.prompt for s in samples]))
    views = prepared.vision
    assert views.cls is None and views.hidden.shape[:2] == (3, 144)
    assert torch.equal(views.hidden, prepared.inputs_embeds[prepared.visual_mask].view(3, 144, -1))
    for method in ("visionzip", "cdpruner"):
        pruner = get_pruner(PruneConfig(method, 0.333), adapter.n_layers)
        out = Engine(adapter).generate(prepared, GenerationConfig(max_new_tokens=3), pruner=pruner)
        assert [len(kept) for kept in out.trace.kept] == [48, 48, 48]


def test_visionzip_shares_k_over_llava_next_crops_and_keeps_no_cut_patch():
    family = build_family("llava_next")
    vision, n = family.prepared.vision, family.prepared.n_visual
    assert vision.cls is not None and vision.hidden.shape[0] == 8  # 1 x 2 and 2 x 2 crops, each with a base view
    slots = vision.slot[vision.valid]
    assert len(set(slots.tolist())) == slots.numel() and int(vision.valid.sum()) < int(n.sum())  # newlines: no unit
    ctx_engine = Engine(family.adapter)
    for r in (0.111, 0.333, 0.666, 0.95):  # 0.95: k exceeds the patches of row 0 (75 of 80 tokens)
        pruner = get_pruner(PruneConfig("visionzip", r), family.adapter.n_layers)
        state, _, _, _ = ctx_engine.prefill(family.prepared, 2, pruner=pruner)
        assert state.kept.sum(-1).tolist() == budget(n, r).tolist()
        # a token kept where no patch lands is a newline, taken only when k exceeds the row's patches
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]])
        for b in range(len(n)):
            mine = slots[(slots >= offsets[b]) & (slots < offsets[b] + n[b])] - offsets[b]
            unit_tokens = torch.zeros(int(n[b]), dtype=torch.bool)
            unit_tokens[mine] = True
            newlines_kept = int((state.kept[b, : int(n[b])] & ~unit_tokens).sum())
            assert newlines_kept == max(0, int(budget(n[b:b + 1], r)) - int(unit_tokens.sum()))


def test_budget_shares():
    from dstp.pruners.visionzip import contextual_count, share

    assert share(10, [25, 25]) == [5, 5] and share(7, [25, 25, 50]) == [2, 2, 3] and share(9, [4, 100]) == [0, 9]
    assert sum(share(13, [3, 5, 7])) == 13 and share(40, [3, 5]) == [3, 5]  # capped at each part's size
    # the authors' presets for LLaVA-1.5 (576 patches): 54+10, 108+20, 162+30 tokens
    assert [contextual_count(k, 10 / 64) for k in (64, 128, 192)] == [10, 20, 30]
    assert contextual_count(1, 0.9) == 0 and contextual_count(3, 0.9) == 2


@pytest.mark.parametrize("name", sorted(ALL_FAMILIES))
def test_vision_units_project_to_the_models_own_visual_tokens(name):
    """Every family's internals are coherent: projecting each unit's features and placing them at its slot gives
    the model's own visual embeddings (so a merged unit projects as the model would project it)."""
    family = build_family(name)
    prepared, vision = family.prepared, family.prepared.vision
    flat = prepared.inputs_embeds[prepared.visual_mask]  # [n_tokens, D] in placeholder order
    with torch.no_grad():
        projected = vision.project(vision.hidden[vision.valid])
    assert torch.allclose(projected, flat[vision.slot[vision.valid]], atol=1e-5)
    assert vision.keys.shape[:2] == vision.scores.shape == vision.slot.shape
    if name in ("llava", "llava_next"):  # CLIP's CLS token, at the feature layer
        assert vision.cls is not None and vision.cls.shape == (vision.hidden.shape[0], vision.hidden.shape[-1])
    else:
        assert vision.cls is None
