"""The real path: `dstp.load("org/name")` offline + `pipe.chat(...)` gives transformers' own greedy tokens.

Each family's hub-shaped fixture (tests/hub_fixtures.py: a tiny random model saved with the family's real
processor classes, a small real tokenizer and a chat template) is loaded by its id from an offline cache. The
reference is `model.generate(**processor.apply_chat_template(..., tokenize=True, return_dict=True))`."""
import copy

import pytest
import torch

import dstp
from dstp import ConfigError, InputError, PruneConfig, DSTPConfig
from hub_fixtures import FAMILIES, MORE_FAMILIES, conversation, sample_images

NEW = 12


def reference_tokens(pipe, conversations, **generate_kwargs):
    processor, model = pipe.processor, pipe.adapter.model
    inputs = processor.apply_chat_template(copy.deepcopy(conversations), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt",
                                           processor_kwargs={"padding": True, "padding_side": "left"})
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=NEW, **generate_kwargs)
    return out[:, inputs["input_ids"].shape[1]:]


def cases():
    """name -> conversations: one image; a batch of 3 (image sizes and lengths differ); two images in one
    message; a text-only row beside an image row."""
    a, b, c, d = sample_images(4, seed=3, sizes=[(40, 40), (96, 64), (32, 72), (64, 32)])
    return {
        "single": [conversation([a], "what is in the picture")],
        "batch3": [conversation([a], "describe it"),
                   conversation([b], "what colour is the left part of this picture, in a few words"),
                   conversation([c], "count the shapes", system="you are a careful assistant")],
        "two_images": [conversation([b, d], "compare the two pictures")],
        "mixed_text_only": [conversation([], "tell me a story about a cat"), conversation([c], "what is this")],
    }


@pytest.fixture(scope="module", params=[(f, d) for f in FAMILIES + MORE_FAMILIES for d in ("float32", "bfloat16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pipe(request, hub_models):
    family, dtype = request.param
    return dstp.load(hub_models[family], dtype=dtype)


@pytest.mark.parametrize("case", ["single", "batch3", "two_images", "mixed_text_only"])
def test_chat_equals_transformers_generate(pipe, case):
    conversations = cases()[case]
    expected = reference_tokens(pipe, conversations, do_sample=False)
    out = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)
    assert out.tokens.shape == expected.shape
    assert torch.equal(out.tokens, expected)
    assert out.tokens.shape[0] == len(out.texts) == len(conversations)


def test_chat_with_pruning_and_dstp_runs_every_family(pipe):
    pruned = dstp.from_model(pipe.adapter.model, pipe.processor, prune=PruneConfig("fastv", 0.333),
                             shift=DSTPConfig(force_every=3))
    out = pruned.chat(cases()["batch3"] + cases()["mixed_text_only"], max_new_tokens=6, do_sample=False)
    n_visual = out.trace.n_visual
    assert n_visual[3] == 0 and min(n_visual[:3] + n_visual[4:]) > 0  # the text-only row has no visual tokens
    for b, n in enumerate(n_visual):
        assert len(out.trace.kept[b]) == (0 if n == 0 else -(-n * 333 // 1000))
    assert any(step["shift"] for step in out.trace.row(0)["steps"])


def test_checkpoint_sampling_defaults_equal_generate_without_arguments(hub_models):
    pipe = dstp.load(hub_models["qwen2_5_vl_sampling"])
    assert pipe.adapter.generation_defaults()["repetition_penalty"] == 1.05
    conversations = cases()["batch3"]
    expected = reference_tokens(pipe, conversations)  # no arguments: the checkpoint's sampling settings
    out = pipe.chat(conversations, max_new_tokens=NEW)
    assert torch.equal(out.tokens, expected)
    greedy = pipe.chat(conversations, max_new_tokens=NEW, do_sample=False)  # plain greedy: no penalty
    assert torch.equal(greedy.tokens, reference_tokens(pipe, conversations, do_sample=False, repetition_penalty=1.0))


def test_generate_takes_prompts_with_several_or_no_images(hub_models):
    pipe = dstp.load(hub_models["qwen2_5_vl"])
    a, b = sample_images(2, seed=5, sizes=[(40, 40), (64, 32)])
    conversations = [conversation([a, b], "compare"), conversation([], "hello there")]
    prompts = [pipe.processor.apply_chat_template(copy.deepcopy(c), add_generation_prompt=True) for c in conversations]
    out = pipe.generate([[a, b], None], prompts, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out.tokens, pipe.chat(conversations, max_new_tokens=NEW, do_sample=False).tokens)


def test_load_by_id_gives_the_real_classes_and_passes_kwargs(hub_models):
    pipe = dstp.load(hub_models["llava"], dtype="bf16", revision="main", device="cpu")
    assert type(pipe.processor).__name__ == "LlavaProcessor" and pipe.adapter.dtype == torch.bfloat16
    assert type(pipe.adapter.model).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(InputError, match="checkpoint not found"):
        dstp.load(hub_models["llava"], revision="no-such-revision")


def test_from_model_accepts_subclasses(hub_models):
    from transformers import LlavaForConditionalGeneration

    class MyLlava(LlavaForConditionalGeneration):
        pass

    base = dstp.load(hub_models["llava"])
    model = MyLlava(base.adapter.model.config).eval()
    model.load_state_dict(base.adapter.model.state_dict())
    conv = cases()["single"]
    assert torch.equal(dstp.from_model(model, base.processor).chat(conv, max_new_tokens=NEW).tokens,
                       base.chat(conv, max_new_tokens=NEW).tokens)


def test_bad_inputs_are_one_line_dstp_errors(hub_models, tmp_path):
    cases_ = [
        (lambda: dstp.load("no-such-org/no-such-model"), InputError, "checkpoint not found: 'no-such-org/no-such"),
        (lambda: dstp.load(hub_models["llava"], dtype="float8"), ConfigError, "unknown dtype 'float8'"),
        (lambda: dstp.load(hub_models["llava"], device="cuda:7"), ConfigError, "cuda"),
        (lambda: dstp.load(hub_models["llava"], device_map={"model.vision_tower": "cpu", "model.multi_modal_projector":
                                                            "cpu", "model.language_model": "meta", "lm_head": "cpu"}),
         ConfigError, "several devices (cpu, meta)"),
        (lambda: dstp.load(hub_models["llava"], device="cpu", device_map="cpu"), ConfigError, "not both"),
    ]
    pipe = dstp.load(hub_models["llava"])
    img = sample_images(1, seed=0)[0]
    cases_ += [
        (lambda: pipe.chat([[{"role": "user", "content": [{"type": "text", "text": "<image> what"}]}]]),
         InputError, "image placeholder '<image>'"),
        (lambda: pipe.chat(conversation([img], "what")), InputError, "list of conversations"),
        (lambda: pipe.chat([[{"role": "robot", "content": "hi"}]]), InputError, "unknown role 'robot'"),
        (lambda: pipe.chat([[{"role": "user", "content": [{"type": "image"}]}]]), InputError, "needs the image"),
        (lambda: pipe.generate(None, ["<image> what"]), InputError, "images must be a list"),
        (lambda: pipe.generate([[img, img]], ["<image> what"]), InputError, "1 image placeholder"),
        (lambda: pipe.chat(cases()["single"], max_new_tokens=10**9), ConfigError, "does not fit"),
        (lambda: pipe.chat(cases()["single"], temprature=0.3), ConfigError, "unknown generation argument"),
    ]
    # a directory with weights but no processor files
    pipe.adapter.model.save_pretrained(tmp_path / "weights-only")
    cases_.append((lambda: dstp.load(str(tmp_path / "weights-only")), InputError, "cannot load the processor"))
    for call, kind, needle in cases_:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, dstp.DSTPError), info.value
        message = str(info.value)
        assert needle in message and "\n" not in message, message


def test_cli_generate_takes_a_hub_id_and_chat_input(hub_models, tmp_path, capsys):
    from dstp.lab.cli.main import main

    paths = []
    for i, image in enumerate(sample_images(2, seed=9, sizes=[(40, 40), (64, 32)])):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    argv = ["generate", "--model", hub_models["qwen2_5_vl"], "--image", paths[0], "--image", paths[1], "--prompt",
            "compare the pictures", "--max-new-tokens", "6", "--prune", "divprune", "--retention", "0.5", "--dstp",
            "--trace"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    pipe = dstp.load(hub_models["qwen2_5_vl"], prune=PruneConfig("divprune", 0.5), shift=DSTPConfig())
    from PIL import Image
    expected = pipe.chat([conversation([Image.open(p).convert("RGB") for p in paths], "compare the pictures")],
                         max_new_tokens=6)
    assert out.startswith(expected.texts[0] + "\n")
    assert "visual tokens 57, kept 29" in out  # 25 + 32 visual tokens of the two images
    assert main(["generate", "--model", "no-such-org/model", "--prompt", "hi"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_processor_kwargs_reach_the_processor(hub_models):
    small = dstp.load(hub_models["qwen2_5_vl"], processor_kwargs={"max_pixels": 16 * 16 * 16})
    image = sample_images(1, seed=2, sizes=[(96, 64)])
    out = small.chat([conversation(image, "what")], max_new_tokens=2)
    from transformers import AutoProcessor

    reference = AutoProcessor.from_pretrained(hub_models["qwen2_5_vl"], max_pixels=16 * 16 * 16)
    inputs = reference.apply_chat_template(conversation(image, "what"), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    n = int((inputs["input_ids"] == reference.image_token_id).sum())
    assert out.trace.n_visual == [n] and n < 70  # 70 visual tokens at the fixture's own limit


def test_language_model_attends_through_dstp_and_vision_keeps_its_own(hub_models):
    pipe = dstp.load(hub_models["llava"], attn_implementation="eager")
    model = pipe.adapter.model
    assert model.config.get_text_config()._attn_implementation == "dstp"
    assert model.config.vision_config._attn_implementation == "eager"


@pytest.mark.parametrize("family,field", [("llava", "'image_token_index' or 'image_token_id'"),
                                          ("qwen3_vl", "'vision_config'")])
def test_config_without_a_field_the_adapter_needs_is_one_line(hub_models, tmp_path, family, field):
    import json
    import shutil

    from conftest import HF_HUB_CACHE
    from hub_fixtures import snapshot_dir

    repo = tmp_path / "repo"
    shutil.copytree(snapshot_dir(HF_HUB_CACHE, hub_models[family]), repo)
    config = json.loads((repo / "config.json").read_text())
    for name in ("image_token_index", "image_token_id") if family == "llava" else ("vision_config",):
        config.pop(name, None)
    (repo / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as e:
        dstp.load(str(repo))
    assert str(e.value) == f"{repo}: config.json has no {field}, which dstp's {family} adapter needs"
