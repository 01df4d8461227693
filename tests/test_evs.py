"""EVS (`dstp.pruners.evs`) against a re-derivation of vLLM's rule (vllm/multimodal/evs.py), written here per video
from its [T, H, W, D] embeddings, on synthetic clips and on the Qwen fixtures' own video embeddings."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import dstp
from dstp import ConfigError, PruneConfig
from dstp.models.video import video_layout
from dstp.pruners import get_pruner
from dstp.pruners.evs import evs_keep
from hub_fixtures import conversation, sample_images
from video_clips import moving_square


def vllm_rule(embeds: torch.Tensor, retention: float) -> torch.Tensor:
    """vLLM's EVS mask of one video [T, H, W, D] (flattened t, h, w): the first frame scores 255, every later
    token 1 - cos with the same token one frame earlier; keep the first max(H*W, int(T*H*W*(1 - q))) by a stable
    descending sort, q = 1 - retention."""
    T, H, W, _ = embeds.shape
    dis = 1 - F.cosine_similarity(embeds[1:].float(), embeds[:-1].float(), dim=-1)
    dis = torch.cat([torch.full((1, H, W), 255.0), dis]).flatten()
    q = 1.0 - retention
    keep = max(H * W, int(T * H * W * (1 - q)))
    mask = torch.zeros(dis.numel(), dtype=torch.bool)
    mask[torch.argsort(dis, descending=True, stable=True)[:keep]] = True
    return mask


def batch_of(rows):
    """rows: per row a list of items, ("image", n) or ("video", (t, h, w)), each with its embeddings drawn here.
    Returns (hidden [B, N, D], visual [B, N], video mask [B, N], grids, per-row items with their embeddings)."""
    g = torch.Generator().manual_seed(0)
    N = max(sum(n if kind == "image" else math.prod(n) for kind, n in row) for row in rows)
    B, D = len(rows), 6
    hidden = torch.zeros(B, N, D)
    visual, video = torch.zeros(B, N, dtype=torch.bool), torch.zeros(B, N, dtype=torch.bool)
    grids, items = [], []
    for b, row in enumerate(rows):
        at = 0
        for kind, n in row:
            size = n if kind == "image" else math.prod(n)
            x = torch.randn(size, D, generator=g)
            if kind == "video":  # frames that partly repeat the previous one: ties and near-ties
                t, h, w = n
                x = x.view(t, h * w, D)
                for f in range(1, t):
                    same = torch.rand(h * w, generator=g) < 0.4
                    x[f, same] = x[f - 1, same] + 1e-3 * torch.randn(int(same.sum()), D, generator=g)
                x = x.reshape(size, D)
                grids.append(n)
                video[b, at:at + size] = True
            hidden[b, at:at + size] = x
            visual[b, at:at + size] = True
            items.append((b, at, kind, n, x))
            at += size
    return hidden, visual, video, grids, items


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.lists(st.one_of(
    st.tuples(st.just("image"), st.integers(1, 5)),
    st.tuples(st.just("video"), st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 4)))),
    min_size=1, max_size=3), min_size=1, max_size=3), retention=st.floats(0.01, 1.0))
def test_evs_equals_vllms_rule_per_video(rows, retention):
    hidden, visual, video, grids, items = batch_of(rows)
    layout = video_layout(visual, video, grids)
    kept = evs_keep(hidden, visual, layout, retention)
    for b, at, kind, n, x in items:
        size = x.shape[0]
        if kind == "image":
            assert bool(kept[b, at:at + size].all())  # images are kept whole
        else:
            t, h, w = n
            assert torch.equal(kept[b, at:at + size], vllm_rule(x.view(t, h, w, -1), retention))
    assert not bool((kept & ~visual).any())


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def pipe(request, hub_models):
    return dstp.load(hub_models[request.param])


def test_evs_on_a_fixture_video_equals_vllms_rule_on_its_embeddings(pipe):
    """A 48-frame clip (several temporal patches on both families) beside an image: the kept video tokens are
    vLLM's rule on the video's own embeddings, reshaped [t, h, w, D] from video_grid_thw; the image stays whole."""
    clip = moving_square(48, seed=4, red_frame=20)
    image = sample_images(1, seed=3, sizes=[(40, 40)])[0]
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "video", "video": clip},
                                         {"type": "text", "text": "which frame shows the red square"}]}]
    batch = pipe.adapter.render_chat(copy.deepcopy([conv]))
    t, h, w = batch["video_grid_thw"][0].tolist()
    merge = pipe.adapter.model.config.vision_config.spatial_merge_size
    assert t >= 2
    pruned = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig("evs", 0.25))
    out = pruned.chat([conv], max_new_tokens=2, do_sample=False)
    prepared = pipe.prepare_chat([conv])
    ids = prepared.input_ids[0][prepared.visual_mask[0]]
    on_video = ids == pipe.adapter.model.config.video_token_id
    embeds = prepared.inputs_embeds[0][prepared.visual_mask[0]][on_video]
    expected = vllm_rule(embeds.view(t, h // merge, w // merge, -1), 0.25)
    kept = torch.zeros(len(ids), dtype=torch.bool)
    kept[out.trace.kept[0]] = True
    assert bool(kept[~on_video].all())
    assert torch.equal(kept[on_video], expected)
    assert int(expected.sum()) == max(h * w // merge ** 2, int(t * h * w // merge ** 2 * 0.25)) < on_video.sum()


def test_evs_refuses_inputs_without_video_and_a_layer_inside_the_llm(pipe, monkeypatch):
    pruned = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig("evs", 0.5))
    convs = [conversation(sample_images(1, seed=0), "what is this")]
    prepared = pipe.prepare_chat(convs)  # the unpruned pipeline prepares them
    monkeypatch.setattr(pruned.adapter, "prepare", lambda *a, **k: pytest.fail("the vision tower ran"))
    with pytest.raises(ConfigError, match="evs prunes video tokens only"):  # the Pipeline, before any model work
        pruned.chat(convs, max_new_tokens=2)
    with pytest.raises(ConfigError, match="evs prunes video tokens only"):  # the pruner, on prepared inputs
        pruned.generate_prepared(prepared, pruned.generation_config(2, {}))
    with pytest.raises(ConfigError, match="before the LLM"):
        get_pruner(PruneConfig("evs", 0.5, layer=2), 4)
