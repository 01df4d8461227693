"""The plugin's wiring and its refusals: entry point, `import dstp` without vLLM, one-line errors at engine start
(a method vLLM cannot run, DSTP, a retention outside (0, 1], an architecture the plugin does not cover), and a
two-image request."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import MAX_TOKENS, chat_prompt


def test_entry_point_names_register():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "dstp"]
    from dstp.integrations.vllm import register
    assert ep.load() is register


def test_import_dstp_imports_no_vllm():
    code = ("import sys, dstp, dstp.integrations.vllm, dstp.integrations.vllm.settings, "
            "dstp.integrations.vllm.selection; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory):
    """A tiny Llama (text only): an architecture the plugin does not cover."""
    import torch
    import transformers as tf

    import tiny_models

    path = tmp_path_factory.mktemp("llama")
    tok = tiny_models.hub._tokenizer("llava")
    cfg = tf.LlamaConfig(vocab_size=tiny_models.hub._vocab_size(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def engine_config(model, overrides):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), hf_overrides=overrides or {}, dtype="float32", max_model_len=512,
                      enforce_eager=True).create_engine_config()


BAD = [
    ({"method": "fastv", "retention": 0.5}, "method 'fastv' cannot run inside vLLM: it prunes inside the LLM"),
    ({"method": "sparsevlm", "retention": 0.5}, "method 'sparsevlm' cannot run inside vLLM: it prunes inside"),
    ({"method": "pyramiddrop", "retention": 0.5}, "method 'pyramiddrop' cannot run inside vLLM: it prunes inside"),
    ({"method": "oracle", "retention": 0.5}, "method 'oracle' cannot run inside vLLM: it needs ShiftBench's"),
    ({"method": "divprune", "retention": 0.5, "contextual_fraction": 0.2}, "contextual_fraction is a visionzip "
                                                                           "setting; method 'divprune' has none"),
    ({"method": "visionzip", "retention": 0.5, "contextual_fraction": 1.0}, "contextual_fraction must be in [0, 1)"),
    ({"method": "nope", "retention": 0.5}, "unknown pruning method 'nope'"),
    ({"method": "divprune", "retention": 1.5}, "retention must be in (0, 1], got 1.5"),
    ({"method": "divprune", "retention": 0}, "retention must be in (0, 1], got 0"),
    ({"method": "divprune", "retention": "half"}, "retention must be in (0, 1], got 'half'"),
    ({"method": "divprune", "retention": 0.5, "tau": 0.75}, "DSTP (decoding-stage re-selection: tau) cannot run"),
    ({"method": "divprune", "retention": 0.5, "shift": {"tau": 0.75}}, "DSTP (decoding-stage re-selection: shift)"),
    ({"method": "divprune", "retention": 0.5, "layer": 2}, "unknown key(s) 'layer'"),
    ({"retention": 0.5}, "needs 'method' and 'retention'"),
    ("divprune", "hf_overrides['dstp'] must be a dict"),
]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("raw,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configuration_is_one_line_at_engine_start(family, raw, message, checkpoints):
    from dstp.integrations.vllm.settings import PluginConfigError

    with pytest.raises(PluginConfigError) as info:
        engine_config(checkpoints[family], {"dstp": raw})
    text = str(info.value)
    assert "\n" not in text and text.startswith("dstp vLLM plugin: ") and message in text, text


def test_visionzip_needs_llava_15_layout(checkpoints):
    """visionzip reads one feature layer and keeps the CLS token apart: a LLaVA that feeds the CLS token to the LLM
    ('full') is refused in one line."""
    from dstp.integrations.vllm.settings import PluginConfigError

    with pytest.raises(PluginConfigError, match=r"^dstp vLLM plugin: visionzip needs LLaVA-1.5's layout"):
        engine_config(checkpoints["llava"], {"vision_feature_select_strategy": "full",
                                             "dstp": {"method": "visionzip", "retention": 0.5}})


def test_unsupported_architecture_is_refused(text_only_checkpoint):
    from dstp.integrations.vllm.settings import PluginConfigError

    with pytest.raises(PluginConfigError, match=r"^dstp vLLM plugin: architecture LlamaForCausalLM is not "
                                                r"supported; supported: LLaVA-1.5 \(LlavaForConditionalGeneration\)"):
        engine_config(text_only_checkpoint, {"dstp": {"method": "divprune", "retention": 0.5}})
    config = engine_config(text_only_checkpoint, None)  # without the key the model is vLLM's business
    assert config.model_config.architecture == "LlamaForCausalLM"


def test_llava_runs_with_mrope_rows_only_when_configured(checkpoints):
    """LLaVA's 1-D RoPE becomes M-RoPE with three identical rows ([rotary_dim / 2, 0, 0]) only with a dstp key."""
    assert not engine_config(checkpoints["llava"], None).model_config.uses_mrope
    config = engine_config(checkpoints["llava"], {"dstp": {"method": "divprune", "retention": 0.5}})
    assert config.model_config.uses_mrope
    assert config.model_config.hf_config.text_config.rope_parameters["mrope_section"] == [32, 0, 0]


def test_llm_with_bad_configuration_fails_before_loading(checkpoints, images, run_engine):
    """Through `LLM(...)` as a user writes it: the process ends with the plugin's one line, no weights loaded."""
    from conftest import EngineFailed

    spec = {"model": str(checkpoints["qwen2_5_vl"]), "hf_overrides": {"dstp": {"method": "fastv", "retention": 0.5}},
            "max_tokens": 4, "requests": [{"prompt": "hi", "images": []}]}
    with pytest.raises(EngineFailed) as info:
        run_engine(spec, timeout=300)
    assert info.value.last_line.startswith("dstp.integrations.vllm.settings.PluginConfigError: dstp vLLM plugin: "
                                           "method 'fastv' cannot run inside vLLM")
    assert "Loading weights" not in info.value.stderr


def test_two_images_in_one_request(checkpoints, images, run_engine):
    """Several images: vLLM prunes each on its own (k_i of N_i), dstp's engine prunes the row's N_1 + N_2 together.
    For `uniform` on LLaVA (16 tokens an image, retention 0.25) both keep ranks 2, 6, 10, 14 of each image, so
    the tokens must agree, which checks the second image's kept tokens sit at their original positions."""
    import dstp
    from dstp import PruneConfig

    pil, paths = images
    path = checkpoints["llava"]
    prompt = chat_prompt(path, n_images=2)
    pairs = [(0, 1), (2, 3)]
    out = run_engine({"model": str(path), "hf_overrides": {"dstp": {"method": "uniform", "retention": 0.25}},
                      "max_tokens": MAX_TOKENS,
                      "requests": [{"prompt": prompt, "images": [paths[a], paths[b]]} for a, b in pairs]})
    pipe = dstp.load(path, prune=PruneConfig(method="uniform", retention=0.25), dtype="float32")
    for o, (a, b) in zip(out["outputs"], pairs):
        ref = pipe.generate([[pil[a], pil[b]]], [prompt], max_new_tokens=MAX_TOKENS, do_sample=False,
                            stop_token_ids=())
        assert o["token_ids"] == ref.tokens[0].tolist()
        full = pipe.prepare([[pil[a], pil[b]]], [prompt])
        assert len(o["prompt_token_ids"]) == int(full.attention_mask.sum()) - 2 * (16 - 4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_videos_pass_through_unpruned(family, checkpoints, images, run_engine, tmp_path):
    """The plugin prunes images only: a video keeps all its tokens and positions. A video-only request gives vLLM's
    own tokens with a `dstp` key; a request with an image and a video gives them at retention 1.0, and at 0.25 is
    shorter by the image's N - k only."""
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 256, size=(4, 48, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "video.npy", frames)
    video = {"frames": str(tmp_path / "video.npy"),
             "metadata": {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "width": 48, "height": 48,
                          "frames_indices": [0, 1, 2, 3], "video_backend": "opencv"}}
    head, tail = "<|im_start|>user\n", "What happens in the video?<|im_end|>\n<|im_start|>assistant\n"
    v, i = "<|vision_start|><|video_pad|><|vision_end|>", "<|vision_start|><|image_pad|><|vision_end|>"
    requests = [{"prompt": head + v + tail, "images": [], "video": video},
                {"prompt": head + i + v + tail, "images": [images[1][0]], "video": video}]

    def run(overrides):
        return run_engine({"model": str(checkpoints[family]), "hf_overrides": overrides, "max_tokens": MAX_TOKENS,
                           "requests": requests, "limit_mm_per_prompt": {"image": 1, "video": 1}})["outputs"]

    plain = run(None)
    whole = run({"dstp": {"method": "divprune", "retention": 1.0}})
    pruned = run({"dstp": {"method": "divprune", "retention": 0.25}})
    assert whole == plain
    assert pruned[0] == plain[0]
    n = 25  # the 40x40 image: 5 x 5 tokens after the 2x2 merge
    assert len(pruned[1]["prompt_token_ids"]) == len(plain[1]["prompt_token_ids"]) - (n - 7)
