"""Each named pruner is its authors' rule. The references below are re-derived in plain torch from the papers and the
authors' published code (pkunlp-icler/FastV, vbdi/divprune, dvlab-research/VisionZip, Theia-4869/CDPruner), one
image at a time as the authors run them, on transformers' own outputs (eager attention weights, hidden states,
projector); they share no code with dstp. dstp's kept sets (and VisionZip's merged embeddings) must equal them on
tiny random models: 3 seeds x retentions 0.666 / 0.333 / 0.111, batch of 3 rows with left padding.

Budget convention (dstp's, for every method): k = ceil(retention * N) tokens per image; VisionZip's k counts its
CLS token and spends round(k * 10 / 64) on contextual tokens (the authors' presets 54+10, 108+20, 162+30)."""
import copy
import math

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dstp.config import PruneConfig
from dstp.engine import engine as engine_module
from dstp.engine.engine import Engine
from dstp.models.registry import adapter_for_model
from dstp.pruners import get_pruner
from dstp.lab.bench import tiny_models as tm

SEEDS = (0, 1, 2)
RETENTIONS = (0.666, 0.333, 0.111)
IMAGE = tm.IMAGE_TOKEN
SIDE = 8  # 8 x 8 = 64 patches per image: every retention leaves VisionZip some contextual tokens


def tiny_llava(seed):
    """CLIP (3 layers: the feature layer -2 is a middle one, 48x48 views, 6x6 patches, CLS) + 4-layer Llama."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=6 * SIDE, patch_size=6, projection_dim=32)
    text = LlamaConfig(vocab_size=tm.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=SIDE * SIDE)
    cfg._attn_implementation = "sdpa"
    return tm._init(LlavaForConditionalGeneration(cfg), seed)


def llava_batch(seed):
    """3 rows: BOS + text + 64 image tokens + text (different lengths each side, so left padding differs)."""
    g = torch.Generator().manual_seed(100 + seed)
    rows = []
    for before, after in ((3, 5), (7, 2), (1, 6)):
        rows.append(torch.cat([torch.tensor([1]), torch.randint(3, 90, (before,), generator=g),
                               torch.full((SIDE * SIDE,), IMAGE), torch.randint(3, 90, (after,), generator=g)]))
    ids, mask = tm.left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 6 * SIDE, 6 * SIDE, generator=g)}


@pytest.fixture(scope="module", params=SEEDS)
def case(request):
    seed = request.param
    model = tiny_llava(seed)
    batch = llava_batch(seed)
    adapter = adapter_for_model(model)
    return model, batch, adapter, adapter.prepare(batch)


def budget(n, retention):
    return math.ceil(n * retention - 1e-9)


def dstp_prefill(adapter, prepared, method, retention, layer=None):
    pruner = get_pruner(PruneConfig(method, retention, layer=layer), adapter.n_layers)
    state, _, _, _ = Engine(adapter).prefill(prepared, 2, pruner=pruner)
    kept = [torch.nonzero(state.kept[b]).flatten().tolist() for b in range(state.kept.shape[0])]
    return kept, state


def llm_input_after_pruning(adapter, prepared, method, retention) -> torch.Tensor:
    """[B, T, D] what the first pruned stage's layers receive (merged tokens included), in the prompt's layout
    (zero at the tokens it does not hold)."""
    engine, seen = Engine(adapter), {}
    run = engine_module.run_layers

    def spy(adapter_, layers, h, *args, **kwargs):
        seen.setdefault(layers, h)  # the first call on these layers: the prefill's
        return run(adapter_, layers, h, *args, **kwargs)

    engine_module.run_layers = spy
    try:
        pruner = get_pruner(PruneConfig(method, retention), adapter.n_layers)
        state, _, _, _ = engine.prefill(prepared, 2, pruner=pruner)
    finally:
        engine_module.run_layers = run
    stage = state.stages[0]
    h = seen[stage.layers]
    B, T = prepared.attention_mask.shape
    valid = stage.store.valid[:, stage.store.reserve: stage.store.reserve + stage.Tk]
    into = torch.where(valid, stage.index, T)[..., None].expand_as(h)
    return torch.zeros(B, T + 1, h.shape[-1]).scatter(1, into, h)[:, :T]


def image_positions(batch, b):
    return torch.nonzero(batch["input_ids"][b] == IMAGE).flatten()


def projected_features(model, batch):
    """[images, N, D]: transformers' own image features (vision tower + projector), one image per row."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-2,
                                             vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output))


# -- FastV (Chen et al., ECCV 2024) --------------------------------------------------------------------------------
def fastv_reference(model, batch, K, retention):
    """At layer K: keep the image tokens that the last token attends to most at layer K-1 (eager attention weights,
    mean over heads), top round(N * (1 - R)) in the authors' code, here k = ceil(retention * N)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        att = eager(**batch, position_ids=positions, output_attentions=True).attentions[K - 1]
    last = att.mean(1)[:, -1]  # [B, T]
    kept = []
    for b in range(last.shape[0]):
        img = image_positions(batch, b)
        top = last[b, img].topk(budget(len(img), retention)).indices
        kept.append(sorted(top.tolist()))
    return kept


@pytest.mark.parametrize("K", [1, 2])
def test_fastv_is_the_authors_rule(case, K):
    model, batch, adapter, prepared = case
    for r in RETENTIONS:
        assert dstp_prefill(adapter, prepared, "fastv", r, layer=K)[0] == fastv_reference(model, batch, K, r)


def test_fastv_on_qwen2_5_vl():
    """Qwen2.5-VL (M-RoPE; transformers builds the rope index itself from the attention mask)."""
    for seed in SEEDS:
        model = tm.tiny_qwen2_5_vl(seed)
        batch = tm.qwen_batch([(8, 8), (8, 4), (4, 8)], [3, 1, 6], seed=seed)
        adapter = adapter_for_model(model)
        prepared = adapter.prepare(batch)
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        with torch.no_grad():
            att = eager(**batch, output_attentions=True).attentions[1].mean(1)[:, -1]
        for r in RETENTIONS:
            expect = []
            for b in range(att.shape[0]):
                img = image_positions(batch, b)
                expect.append(sorted(att[b, img].topk(budget(len(img), r)).indices.tolist()))
            assert dstp_prefill(adapter, prepared, "fastv", r, layer=2)[0] == expect


# -- DivPrune (Alvar et al., CVPR 2025) ---------------------------------------------------------------------------
def divprune_reference(features, retention):
    """The authors' greedy max-min: distance 1 - cosine of the projected features; the first pick maximises the
    distance to its nearest other token (the second smallest entry of its column), every later pick maximises the
    distance to the nearest token already picked."""
    x = features / features.norm(dim=1, keepdim=True)
    dist = 1.0 - x @ x.T
    picks = []
    for i in range(budget(features.shape[0], retention)):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(scores.argmax()))
    return sorted(picks)


def test_divprune_is_the_authors_rule(case):
    model, batch, adapter, prepared = case
    feats = projected_features(model, batch)
    for r in RETENTIONS:
        assert dstp_prefill(adapter, prepared, "divprune", r)[0] == [divprune_reference(f, r) for f in feats]


# -- VisionZip (Yang et al., CVPR 2025) ---------------------------------------------------------------------------
def visionzip_reference(model, batch, retention):
    """Per image, as the authors' CLIP patch computes it at the vision feature layer (-2): dominant = CLS + the
    patches with the largest CLS attention summed over heads; the rest in index order, targets at ranks 0, s, 2s..
    (s = max(1, M // c)), the others assigned to the target with the most similar head-mean key (cosine), each
    contextual token = target + mean(assigned hidden states); [dominant (CLS first), contextual] -> projector.
    Returns per image (kept patch indices: dominant, targets; their embeddings by patch; the CLS embedding)."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
        layer = tower.encoder.layers[-2]
        x = layer.layer_norm1(out.hidden_states[-3])  # the feature layer's input, normed as its attention reads it
        n, S, _ = x.shape
        keys = layer.self_attn.k_proj(x).view(n, S, 4, -1).mean(2)  # head mean
    attn, hidden = out.attentions[-2], out.hidden_states[-2]
    results = []
    for i in range(n):
        k = budget(S - 1, retention)
        c = math.floor(k * 10 / 64 + 0.5)
        d = k - c  # dominant tokens, CLS included
        top = (attn[i, :, 0, 1:].sum(0).topk(d - 1).indices + 1).tolist()
        dom = sorted([0] + top)
        rest = [t for t in range(S) if t not in dom]
        metric = keys[i, rest] / keys[i, rest].norm(dim=-1, keepdim=True)
        tokens = [hidden[i, t] for t in dom]
        targets = []
        if c:
            step = max(1, len(rest) // c)
            tgt = list(range(0, len(rest), step))[:c]
            merge = [j for j in range(len(rest)) if j not in tgt]
            assign = (metric[merge] @ metric[tgt].T).argmax(1)
            for a, j in enumerate(tgt):
                members = [rest[merge[m]] for m in range(len(merge)) if int(assign[m]) == a]
                mean = hidden[i, members].sum(0) / max(len(members), 1)
                tokens.append(hidden[i, rest[j]] + mean)
            targets = [rest[j] for j in tgt]
        with torch.no_grad():
            emb = model.model.multi_modal_projector(torch.stack(tokens))
        by_patch = {t - 1: emb[m] for m, t in enumerate(dom) if t}
        by_patch.update({t - 1: emb[d + m] for m, t in enumerate(targets)})
        results.append((sorted(by_patch), by_patch, emb[0]))
    return results


def test_visionzip_is_the_authors_rule(case):
    model, batch, adapter, prepared = case
    for r in RETENTIONS:
        kept, state = dstp_prefill(adapter, prepared, "visionzip", r)
        llm_input = llm_input_after_pruning(adapter, prepared, "visionzip", r)
        for b, (patches, by_patch, cls) in enumerate(visionzip_reference(model, batch, r)):
            # dstp places the CLS token at the first patch that is neither dominant nor a target (a departure:
            # the authors' LLM sees [CLS, dominant, contextual] at contiguous positions)
            free = min(set(range(SIDE * SIDE)) - set(patches))
            assert kept[b] == sorted(patches + [free]), (r, b)
            assert len(kept[b]) == budget(SIDE * SIDE, r)
            h = llm_input[b, image_positions(batch, b)]  # the LLM's input at the kept image tokens
            for p, e in by_patch.items():
                assert torch.allclose(h[p], e, atol=1e-5), (r, b, p)
            assert torch.allclose(h[free], cls, atol=1e-5)


# -- CDPruner (Zhang et al., NeurIPS 2025) ------------------------------------------------------------------------
def cdpruner_reference(features, text, retention):
    """The authors' kernel and greedy MAP inference. Relevance inputs are dstp's (stated departure): the LLM's input
    embeddings of the instruction against the projected features, with the similarity's own sign (the authors
    negate CLIP's)."""
    img = (features / features.norm(dim=-1, keepdim=True)).float()
    similarity = img @ img.T
    txt = text / text.norm(dim=-1, keepdim=True)
    relevance = (img @ txt.T).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    T, N = budget(features.shape[0], retention), features.shape[0]
    cis = torch.zeros(T, N)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(T):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[j] = -float("inf")
    return sorted(picks)


def test_cdpruner_is_the_authors_kernel_and_map_inference(case):
    model, batch, adapter, prepared = case
    feats = projected_features(model, batch)
    embed = model.get_input_embeddings()
    for r in RETENTIONS:
        expect = []
        for b in range(feats.shape[0]):
            ids, mask = batch["input_ids"][b], batch["attention_mask"][b].bool()
            after = torch.arange(len(ids)) > image_positions(batch, b).max()
            with torch.no_grad():
                text = embed(ids[after & mask])
            expect.append(cdpruner_reference(feats[b], text, r))
        assert dstp_prefill(adapter, prepared, "cdpruner", r)[0] == expect
