"""RVIS on video: relevance summed per frame (`dstp.rvis.frame_relevance`) and `dstp analyze --video` (frame-by-step
heatmap + shift curve) on the Qwen2.5-VL hub fixture, with its bad input as one line, exit code 2."""
import copy
import json

import pytest
import torch

import dstp
from dstp.config import GenerationConfig
from dstp.lab.cli.main import main
from dstp.rvis import frame_relevance, relevance
from video_clips import moving_square, write_clip

PROMPT = "which frame shows the red square"


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(moving_square(12, seed=3, red_frame=5), tmp_path_factory.mktemp("clip") / "clip.mp4", fps=4)


def test_frame_relevance_sums_each_frames_tokens():
    r = torch.arange(2 * 3 * 7, dtype=torch.float32).view(2, 3, 7)  # [L, S, N]: 1 image token, 2 frames x 3
    frame = torch.tensor([-1, 0, 0, 0, 1, 1, 1])
    got = frame_relevance(r, frame)
    assert got.shape == (2, 3, 2)
    assert torch.equal(got[..., 0], r[..., 1:4].sum(-1)) and torch.equal(got[..., 1], r[..., 4:7].sum(-1))


def test_analyze_video_writes_the_frame_by_step_heatmap(hub_models, clip, tmp_path, capsys):
    out = tmp_path / "an"
    model = hub_models["qwen2_5_vl"]
    argv = ["analyze", "--model", model, "--video", clip, "--prompt", PROMPT, "--max-new-tokens", "5",
            "--layer", "2", "--out", str(out)]
    assert run_cli(argv) == 0
    result = json.loads((out / "rvis.json").read_text())
    for png in ("shift_curve.png", "frames.png"):
        assert (out / png).stat().st_size > 1000
    # the same relevance from the library, summed per frame by hand
    pipe = dstp.load(model)
    conv = [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": PROMPT}]}]
    prepared = pipe.prepare_chat([copy.deepcopy(conv)])
    gen = pipe.engine.generate(prepared, GenerationConfig(max_new_tokens=5))
    n = gen.trace.new_tokens[0]
    rel = relevance(pipe.engine, prepared, gen.tokens[:, :n])[0, 2]  # [S, N]
    frame = prepared.video.frame[0, : rel.shape[-1]]
    t = int(pipe.adapter.render_chat([copy.deepcopy(conv)])["video_grid_thw"][0, 0])
    expect = torch.stack([rel[:, frame == f].sum(-1) for f in range(t)], -1)
    got = torch.tensor(result["frame_relevance"])
    assert got.shape == (n, t) and t >= 2
    assert torch.allclose(got, expect, atol=1e-6)
    assert result["read_frame"] == expect.argmax(-1).tolist()
    assert "most-read frame per step" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--image", "IMG"], "either --image or --video"),
    (["--prompt", None], "--video needs --prompt"),
    (["--video", "/no/such.mp4"], "no such file"),
])
def test_analyze_video_bad_flags_are_one_line(clip, capsys, extra, needle):
    argv = ["analyze", "--model", "M", "--video", clip, "--prompt", PROMPT]
    if extra == ["--prompt", None]:
        argv = argv[:-2]
    elif extra[0] == "--video":
        argv[argv.index("--video") + 1] = extra[1]
    else:
        argv += extra
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_analyze_video_on_a_family_without_video_is_one_line(hub_models, clip, capsys):
    assert run_cli(["analyze", "--model", hub_models["llava"], "--video", clip, "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llava adapter takes no video input" in err[0]
