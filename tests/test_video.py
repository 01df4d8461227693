"""Video through `pipe.chat` (Qwen2.5-VL, Qwen3-VL hub fixtures): tokens equal transformers' `generate()` on the
processor's own output, every pruner and DSTP run on video tokens, and bad video input is one line before any
model work."""
import copy

import numpy as np
import pytest
import torch

import dstp
from dstp import DSTPConfig, InputError, PruneConfig
from dstp.models.video import decode_video
from dstp.pruners import PRUNERS
from dstp.pruners.base import budget
from hub_fixtures import sample_images
from video_clips import moving_square, write_clip

NEW = 8
VIDEO_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def video_item(video):
    return {"type": "video", "video": video}


def user(*items, text="what happens in the clip"):
    return [{"role": "user", "content": [*items, {"type": "text", "text": text}]}]


def reference_tokens(pipe, conversations, metadata=None):
    kwargs = {"padding": True, "padding_side": "left"}
    if metadata:
        kwargs["video_metadata"] = metadata
    inputs = pipe.processor.apply_chat_template(copy.deepcopy(conversations), add_generation_prompt=True,
                                                tokenize=True, return_dict=True, return_tensors="pt",
                                                processor_kwargs=kwargs)
    model = pipe.adapter.model
    inputs = {k: v.to(model.dtype) if k.startswith("pixel_values") else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def pipe(request, hub_models):
    return dstp.load(hub_models[request.param])


def frames_batch():
    """A clip as PIL frames; a clip as an array beside an image; 48 frames (Qwen3-VL samples 2 fps of 24)."""
    pil = sample_images(8, seed=1, sizes=[(48, 32)] * 8)
    image = sample_images(1, seed=3, sizes=[(40, 40)])[0]
    return [user(video_item(pil)),
            user({"type": "image", "image": image}, video_item(moving_square(6, seed=2, size=(40, 40))),
                 text="compare the picture with the clip"),
            user(video_item(moving_square(48, seed=4, red_frame=20)), text="which frame shows the red square")]


def test_video_frames_equal_transformers_generate(pipe):
    conversations = frames_batch()
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, conversations))
    prepared = pipe.prepare_chat(conversations)
    video = prepared.input_ids == pipe.adapter.model.config.video_token_id
    assert bool((prepared.visual_mask & video).any()) and torch.equal(prepared.visual_mask & video, video)
    assert int(prepared.video.frame.max()) >= 1  # several frames on the time axis


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_in_bfloat16_equals_transformers_generate(hub_models, family):
    pipe = dstp.load(hub_models[family], dtype="bfloat16")
    conversations = frames_batch()
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, conversations))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qwen3_vl_moe_video_equals_transformers_generate(hub_models, dtype):
    """Qwen3-VL-MoE takes video through Qwen3-VL's adapter: the same clips, the same tokens as generate()."""
    pipe = dstp.load(hub_models["qwen3_vl_moe"], dtype=dtype)
    conversations = frames_batch()
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, conversations))


def test_video_file_equals_generate_on_its_decoded_frames(pipe, tmp_path):
    path = write_clip(moving_square(16, seed=5, red_frame=7), tmp_path / "clip.mp4", fps=4)
    frames, metadata = decode_video(path)
    assert frames.shape == (16, 32, 48, 3) and metadata.fps == 4
    out = pipe.chat([user(video_item(path))], max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, reference_tokens(pipe, [user(video_item(frames))], [metadata]))


def test_video_tokens_keep_their_temporal_positions(pipe):
    """Position ids are transformers' get_rope_index on the processor's own token types and grids, and a later
    frame's tokens sit later on the time axis."""
    conversations = frames_batch()[2:]
    batch = pipe.adapter.render_chat(copy.deepcopy(conversations))
    prepared = pipe.adapter.prepare(batch)
    extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if "second_per_grid_ts" in batch else {}
    expected, _ = pipe.adapter.model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=None,
        video_grid_thw=batch["video_grid_thw"], attention_mask=batch["attention_mask"], **extra)
    assert torch.equal(prepared.position_ids, expected)
    frame = prepared.video.frame[0]
    t = prepared.position_ids[0, 0, prepared.visual_mask[0]]  # the time axis, in placeholder order
    assert int(frame.max()) >= 1 and bool((t[1:] >= t[:-1]).all())
    for f in range(int(frame.max()) + 1):  # one time position per frame
        assert t[frame == f].unique().numel() == 1
    if pipe.adapter.family == "qwen3_vl":  # each frame after its timestamp text: strictly later
        assert int(t[frame == frame.max()].min()) > int(t[frame == 0].max())
    # Qwen2.5-VL spaces frames by tokens_per_second x second_per_grid_ts, which transformers 5.17 truncates to an
    # int first: under 1 s per temporal patch, every frame there shares one time position (as generate() sees it)


@pytest.mark.parametrize("method", sorted(m for m in PRUNERS if m != "oracle"))
def test_every_pruner_runs_on_video_tokens(pipe, method):
    conversations = frames_batch()
    pruned = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig(method, 0.3, seed=1))
    out = pruned.chat(conversations, max_new_tokens=3, do_sample=False)
    n = torch.tensor(out.trace.n_visual)
    kept = [len(k) for k in out.trace.kept]
    if method == "evs":  # per video: at least its first frame (tests/test_evs.py); images kept whole
        assert all(0 < k <= v for k, v in zip(kept, n.tolist())) and kept[2] < n[2]  # row 2: several frames
    elif method != "sparsevlm":  # sparsevlm adds its cluster tokens (test_pruner_rules_sparse.py)
        assert kept == budget(n, 0.3).tolist()


@pytest.mark.parametrize("source", ["recompute", "store"])
@pytest.mark.parametrize("method", ["fastv", "evs"])
def test_dstp_revives_video_tokens(pipe, method, source):
    conversations = frames_batch()
    pruned = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig(method, 0.3),
                             shift=DSTPConfig(force_every=2, source=source))
    out = pruned.chat(conversations, max_new_tokens=5, do_sample=False)
    assert any(step["shift"] for step in out.trace.row(0)["steps"])
    # row 2, a 48-frame clip: what DSTP revives are video tokens the pruner dropped (evs: from frames after the
    # first, which it keeps whole)
    frame = pipe.prepare_chat(conversations[2:]).video.frame[0]
    revived = {r for step in out.trace.row(2)["steps"] for r in step["revived"]}
    assert revived and not revived & set(out.trace.kept[2])
    assert all(int(frame[r]) >= (1 if method == "evs" else 0) for r in revived)
    if source == "store":  # its kept tokens' K/V come from the unpruned prefill: not the pruner's alone
        return
    never = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig(method, 0.3),
                            shift=DSTPConfig(tau=-1.0, source=source))
    alone = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig(method, 0.3))
    assert torch.equal(never.chat(conversations, max_new_tokens=5, do_sample=False).tokens,
                       alone.chat(conversations, max_new_tokens=5, do_sample=False).tokens)


# -- bad input: one line, before any model work ---------------------------------------------------------------
def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_video_to_a_family_without_video_is_refused(hub_models):
    pipe = dstp.load(hub_models["llava"])
    with pytest.raises(InputError) as e:
        pipe.chat([user(video_item(moving_square(4, seed=0)))])
    assert "llava adapter takes no video input" in one_line(e)


@pytest.mark.parametrize("video, words", [
    ([], "zero frames"),
    (np.zeros((0, 32, 48, 3), np.uint8), "zero frames"),
    (sample_images(3, seed=0, sizes=[(48, 32), (48, 32), (40, 40)]), "frame 2 is 40x40"),
    (np.zeros((32, 48, 3), np.uint8), "array [T, H, W, C]"),
    ("/nonexistent/clip.mp4", "video file not found"),
    ("https://example.com/clip.mp4", "video URLs are not fetched"),
])
def test_bad_videos_are_one_line(pipe, video, words):
    with pytest.raises(InputError) as e:
        pipe.chat([user(video_item(video))])
    assert words in one_line(e)


def test_a_clip_time_range_is_refused_not_ignored(pipe):
    with pytest.raises(InputError) as e:
        pipe.chat([user({"type": "video", "video": moving_square(4, seed=0), "video_start": 1.0})])
    assert "video_start / video_end" in one_line(e)


def test_corrupt_file_and_mixed_sources_are_one_line(pipe, tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    with pytest.raises(InputError) as e:
        pipe.chat([user(video_item(str(bad)))])
    assert "cannot decode the video file" in one_line(e)
    good = write_clip(moving_square(4, seed=1), tmp_path / "good.mp4")
    with pytest.raises(InputError) as e:
        pipe.chat([user(video_item(good)), user(video_item(moving_square(4, seed=1)))])
    assert "mixes video files and videos given as frames" in one_line(e)


def test_more_frames_than_the_context_is_refused_before_the_vision_tower(pipe, monkeypatch):
    config = pipe.adapter.text_config
    monkeypatch.setattr(config, "max_position_embeddings", 64)
    calls = []
    monkeypatch.setattr(pipe.adapter, "prepare", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError) as e:
        pipe.chat([user(video_item(moving_square(48, seed=4)))])
    assert "more than the model's context of 64 positions" in one_line(e) and not calls
