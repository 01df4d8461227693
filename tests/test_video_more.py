"""Video on the families after Qwen2.5-VL / Qwen3-VL (tests/test_video.py's clips and reference).

Qwen3.5 (hub fixture tests/hub_fixture_qwen3_5.py, hybrid LLM): tokens equal transformers' `generate()` on the
processor's own output (float32 and bfloat16; a clip alone, a clip beside an image, a 48-frame clip); pruners
before the LLM (random, evs) and FastV after the first full-attention layer (layer 4, ranking by layer 3) on
video tokens equal the model's own layers on the physically shortened sequence (tests/hybrid_reference.py);
VisionZip (per frame) and DSTP `store` after FastV at 4 run on video.

LLaVA-OneVision (hub fixture of tests/hub_fixtures.py): tokens equal `generate()` (float32 and bfloat16; a clip
alone, a clip beside an image; its processor stacks a batch's clips, so they share one frame count), each video's
newline placeholder lies on no frame, evs keeps vLLM's rule on the pooled frames, every other pruner and DSTP run
on video tokens, VisionZip and clips of different lengths are refused in one line; `dstp analyze --video` runs."""
import pytest
import torch

import dstp
import hub_fixture_qwen3_5 as Q
from dstp import DSTPConfig, InputError, PruneConfig
from dstp.pruners import PRUNERS
from dstp.pruners.base import budget
from hub_fixtures import sample_images
from hybrid_reference import shortened_generate
from test_evs import vllm_rule
from test_video import NEW, frames_batch, one_line, reference_tokens, user, video_item
from video_clips import moving_square

qwen3_5 = pytest.mark.skipif(not Q.available(), reason="transformers before 5.17 has no Qwen3.5 classes")


@pytest.fixture(scope="module")
def qwen3_5_repo(hub_models):
    from conftest import HF_HUB_CACHE

    return Q.build(HF_HUB_CACHE)


@qwen3_5
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qwen3_5_video_equals_transformers_generate(qwen3_5_repo, dtype):
    pipe = dstp.load(qwen3_5_repo, dtype=dtype)
    conversations = frames_batch()
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, conversations))
    prepared = pipe.prepare_chat(conversations)
    video = prepared.input_ids == pipe.adapter.model.config.video_token_id
    assert bool(video.any()) and torch.equal(prepared.visual_mask & video, video)
    assert int(prepared.video.frame.max()) >= 1


@qwen3_5
def test_qwen3_5_answers_depend_on_the_clip(qwen3_5_repo):
    pipe = dstp.load(qwen3_5_repo)
    a, b = frames_batch()[0], frames_batch()[2]
    b[0]["content"][-1]["text"] = a[0]["content"][-1]["text"]
    out = pipe.chat([a, b], max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(out.tokens[0], out.tokens[1])


@qwen3_5
@pytest.mark.parametrize("method, layer", [("random", 0), ("evs", 0), ("fastv", 4)])
def test_qwen3_5_pruners_on_video_equal_the_shortened_run(qwen3_5_repo, method, layer):
    pipe = dstp.load(qwen3_5_repo, prune=PruneConfig(method, 0.3, layer=layer, seed=1))
    prepared = pipe.prepare_chat(frames_batch())
    out = pipe.engine.generate(prepared, pipe.generation_config(NEW, {"do_sample": False}), pruner=pipe.pruner,
                               return_logits=True)
    assert [s[0] for s in out.trace.stages] == [layer]
    kept, n = [len(k) for k in out.trace.kept], out.trace.n_visual
    assert all(0 < k <= v for k, v in zip(kept, n)) and kept[2] < n[2]  # evs keeps a one-frame clip whole
    tokens, logits = shortened_generate(pipe.adapter.model, prepared, out.trace.stages, NEW)
    assert torch.equal(out.tokens, tokens)
    assert (out.logits - logits).abs().max() <= 1e-5



@qwen3_5
def test_qwen3_5_visionzip_and_dstp_store_run_on_video(qwen3_5_repo):
    conversations = frames_batch()
    zipped = dstp.load(qwen3_5_repo, prune=PruneConfig("visionzip", 0.3))
    out = zipped.chat(conversations, max_new_tokens=3, do_sample=False)
    assert [len(k) for k in out.trace.kept] == budget(torch.tensor(out.trace.n_visual), 0.3).tolist()
    revived = dstp.load(qwen3_5_repo, prune=PruneConfig("fastv", 0.3, layer=4),
                        shift=DSTPConfig(source="store", force_every=2))
    out = revived.chat(conversations, max_new_tokens=5, do_sample=False)
    back = {r for step in out.trace.row(2)["steps"] for r in step["revived"]}  # row 2: a 48-frame clip only
    assert back and not back & set(out.trace.kept[2])

# -- LLaVA-OneVision ---------------------------------------------------------------------------------------------
FRAMES = 8


def onevision_batch():
    """Clips of one length (the processor stacks them): PIL frames; an array beside an image; a red-frame clip."""
    image = sample_images(1, seed=3, sizes=[(40, 40)])[0]
    return [user(video_item(sample_images(FRAMES, seed=1, sizes=[(48, 32)] * FRAMES))),
            user({"type": "image", "image": image}, video_item(moving_square(FRAMES, seed=2, size=(40, 40))),
                 text="compare the picture with the clip"),
            user(video_item(moving_square(FRAMES, seed=4, red_frame=5)), text="which frame shows the red square")]


@pytest.fixture(scope="module")
def onevision(hub_models):
    return dstp.load(hub_models["llava_onevision"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_onevision_video_equals_transformers_generate(hub_models, dtype):
    pipe = dstp.load(hub_models["llava_onevision"], dtype=dtype)
    conversations = onevision_batch()
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, conversations))


def test_onevision_video_layout_pooled_frames_then_a_newline(onevision):
    prepared = onevision.prepare_chat(onevision_batch())
    video = prepared.input_ids == onevision.adapter.model.config.video_token_id
    h, w = onevision.adapter.frame_grid
    assert (h, w) == (2, 2)  # 4x4 SigLIP patches a frame, pooled 2x2
    assert video.sum(-1).tolist() == [FRAMES * h * w + 1] * 3 and torch.equal(prepared.visual_mask & video, video)
    layout = prepared.video
    for b in range(3):
        ranks = torch.nonzero(video[b][prepared.visual_mask[b]]).flatten()  # this row's video tokens, by rank
        frame = layout.frame[b, ranks]
        assert frame[:-1].tolist() == [f for f in range(FRAMES) for _ in range(h * w)] and frame[-1] == -1
        assert layout.previous[b, ranks[h * w:-1]].tolist() == ranks[:-1 - h * w].tolist()


def test_onevision_evs_keeps_vllms_rule_on_the_pooled_frames(onevision):
    pruned = dstp.from_model(onevision.adapter.model, onevision.processor, prune=PruneConfig("evs", 0.3))
    conversations = onevision_batch()
    out = pruned.chat(conversations, max_new_tokens=2, do_sample=False)
    prepared = onevision.prepare_chat(conversations)
    h, w = onevision.adapter.frame_grid
    for b in range(3):
        ids = prepared.input_ids[b][prepared.visual_mask[b]]
        on_video = ids == onevision.adapter.model.config.video_token_id
        kept = torch.zeros(len(ids), dtype=torch.bool)
        kept[out.trace.kept[b]] = True
        frames = prepared.inputs_embeds[b][prepared.visual_mask[b]][on_video][:-1]
        assert bool(kept[~on_video].all()) and bool(kept[on_video][-1])  # images and the newline kept whole
        expected = vllm_rule(frames.view(FRAMES, h, w, -1), 0.3)
        assert torch.equal(kept[on_video][:-1], expected) and int(expected.sum()) < FRAMES * h * w


@pytest.mark.parametrize("method", sorted(m for m in PRUNERS if m not in ("oracle", "evs", "visionzip")))
def test_every_pruner_runs_on_onevision_video(onevision, method):
    pruned = dstp.from_model(onevision.adapter.model, onevision.processor, prune=PruneConfig(method, 0.3, seed=1))
    out = pruned.chat(onevision_batch(), max_new_tokens=3, do_sample=False)
    kept, n = [len(k) for k in out.trace.kept], torch.tensor(out.trace.n_visual)
    if method == "sparsevlm":  # it adds its cluster tokens (test_pruner_rules_sparse.py)
        assert all(0 < k < v for k, v in zip(kept, n.tolist()))
    else:
        assert kept == budget(n, 0.3).tolist()


def test_onevision_dstp_revives_video_tokens(onevision):
    pruned = dstp.from_model(onevision.adapter.model, onevision.processor, prune=PruneConfig("fastv", 0.3),
                             shift=DSTPConfig(force_every=2, source="recompute"))
    conversations = onevision_batch()
    out = pruned.chat(conversations, max_new_tokens=5, do_sample=False)
    revived = {r for step in out.trace.row(2)["steps"] for r in step["revived"]}
    assert revived and not revived & set(out.trace.kept[2])  # row 2 holds a clip only: video tokens FastV dropped


def test_onevision_refusals_are_one_line(onevision):
    zipped = dstp.from_model(onevision.adapter.model, onevision.processor, prune=PruneConfig("visionzip", 0.3))
    with pytest.raises(InputError) as e:
        zipped.chat(onevision_batch()[:1], max_new_tokens=2)
    assert "cannot give VisionZip the encoder internals of a video" in one_line(e)
    with pytest.raises(InputError) as e:
        onevision.chat([user(video_item(moving_square(6, seed=0))), user(video_item(moving_square(4, seed=1)))])
    assert "different frame counts [6, 4]" in one_line(e)


def test_onevision_analyze_video_reads_every_frame(hub_models, tmp_path):
    """`dstp analyze --video`: a frame-by-step heatmap over the clip's 12 input frames (the newline on none)."""
    import json

    from dstp.lab.cli.main import main
    from video_clips import write_clip

    clip = write_clip(moving_square(12, seed=3, red_frame=5), tmp_path / "clip.mp4", fps=4)
    argv = ["analyze", "--model", hub_models["llava_onevision"], "--video", clip, "--prompt", "which frame",
            "--max-new-tokens", "4", "--layer", "2", "--out", str(tmp_path / "an")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "an" / "rvis.json").read_text())
    steps = len(result["frame_relevance"])
    assert steps >= 1 and {len(row) for row in result["frame_relevance"]} == {12}
    assert len(result["read_frame"]) == steps
