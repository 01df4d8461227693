"""`dstp speed` on tiny shapes: the three synthetic scenarios in one command write every row with its fields, memory
measured next to memory reported, DSTP's host synchronisations per decoding step; the `real` scenario (a model built from a
config.json) on a small Qwen3-VL config, its inputs shaped as the family's processor shapes them; bad input is one
line and exit 2. No timing is checked (the numbers of a shared CI machine are noise)."""
import copy
import json
import pathlib

import pytest
import torch

from dstp.lab.bench.speed.config import SCENARIOS, SMALL
from dstp.lab.bench.speed.models import build_batch
from dstp.lab.bench.speed.real import build_real_batch, real_hf_config, real_image_layout, real_speed_config
from dstp.lab.bench.speed.runner import ROWS
from dstp.lab.bench.speed.syncs import HostSyncs
from dstp.lab.cli.main import main

REAL_CONFIGS = pathlib.Path(__file__).resolve().parent / "real_configs"
QWEN3_VL_4B = REAL_CONFIGS / "Qwen--Qwen3-VL-4B-Instruct"
# Qwen3-VL-4B-Instruct's config.json at a tiny width: the same architecture and layout (interleaved 3-axis M-RoPE,
# DeepStack, patch 16, merge 2, two temporal frames, a tied head), 4 + 3 layers, ids at the top of a 256 vocabulary
TINY_QWEN3_VL = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 251,
    "video_token_id": 252, "vision_start_token_id": 248, "vision_end_token_id": 249, "tie_word_embeddings": True,
    "text_config": {"bos_token_id": 245, "eos_token_id": 246, "head_dim": 32, "hidden_act": "silu", "hidden_size": 64,
                    "intermediate_size": 128, "max_position_embeddings": 4096, "model_type": "qwen3_vl_text",
                    "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2,
                    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 256,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"}},
    "vision_config": {"deepstack_visual_indexes": [0, 1, 2], "depth": 3, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 32, "in_channels": 3, "intermediate_size": 64, "model_type": "qwen3_vl",
                      "num_heads": 4, "num_position_embeddings": 64, "out_hidden_size": 64, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def speed_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    assert run_cli(["speed", "--small", "--scenario", "all", "--new-tokens", "10", "--sync-debug", "--profile",
                    "--compile-backend", "eager", "--out", str(out)]) == 0
    profile = (out / "profile_weight-bound_fastv_dstp_recompute.txt").read_text()
    assert "dstp.step" in profile and "dstp.recompute" in profile and "aten::" in profile
    return json.loads((out / "speed.json").read_text())


SCENARIO_NAMES = ("overhead-bound", "kv-bound", "weight-bound")


def test_every_scenario_writes_every_row(speed_json):
    """Eager and compiled engine rows (compiled: no measured peak on CPU, where the tracker is a dispatch mode that a
    compiled graph runs past), generate() with its static cache compiled too."""
    rows = speed_json["rows"]
    assert [(r["scenario"], r["name"]) for r in rows] == [(s, n) for s in SCENARIO_NAMES for n in ROWS]
    assert sum(r["name"].endswith("_compiled") for r in rows) == 5 * len(SCENARIO_NAMES)
    for r in rows:
        for field in ("scenario", "name", "tokens_per_s", "prefill_s", "peak_bytes_measured", "peak_bytes_reported",
                      "compiled"):
            assert field in r, (r["name"], field)
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r["compiled"] == (r["name"].endswith("_compiled") or r["name"] == "hf_generate_static")
        assert (r["peak_bytes_measured"] is None) if r["compiled"] else r["peak_bytes_measured"] > 0
        if r["name"].startswith("hf_"):
            assert r["ratio_to_ideal"] is None
        else:
            assert r["ratio_to_ideal"] > 0 and r["prefill_ratio_to_ideal"] > 0
    assert set(speed_json["scenarios"]) == set(SCENARIO_NAMES) and speed_json["compile_backend"] == "eager"
    whats = {(t["scenario"], t["what"]) for t in speed_json["targets"]}
    assert ("overhead-bound", "engine_unpruned_compiled / engine_unpruned tokens/s") in whats
    assert ("weight-bound", "engine_unpruned_compiled / hf_generate_static tokens/s") in whats
    assert ("weight-bound", "fastv_dstp_store_compiled / fastv_compiled tokens/s") in whats
    assert ("kv-bound", "fastv_dstp_recompute_compiled decode / ideal") in whats
    assert ("kv-bound", "fastv_dstp_store_compiled / engine_unpruned_compiled tokens/s") in whats
    assert all(isinstance(t["met"], bool) for t in speed_json["targets"])


def test_measured_peak_covers_what_the_engine_reports(speed_json):
    """The engine's figure is what its state holds at the end of the run; the measured peak adds the transient
    working memory (activations, logits) and lacks only the input ids, made before tracking began."""
    for r in speed_json["rows"]:
        if r["name"].startswith("hf_") or r["compiled"]:
            continue
        cfg = SMALL[r["scenario"]]
        ids = build_batch(cfg, "cpu", torch.float32)["input_ids"]
        assert r["peak_bytes_reported"] == sum(r["memory_bytes"].values())
        assert r["peak_bytes_measured"] >= r["peak_bytes_reported"] - ids.numel() * ids.element_size()
    by = {(r["scenario"], r["name"]): r for r in speed_json["rows"]}
    for scenario in SCENARIO_NAMES:
        store, recompute = by[(scenario, "fastv_dstp_store")], by[(scenario, "fastv_dstp_recompute")]
        assert recompute["peak_bytes_reported"] < store["peak_bytes_reported"]
        assert "reserve" in store["memory_bytes"] and "dstp_cache" in recompute["memory_bytes"]


def test_no_host_sync_inside_a_decoding_step(speed_json):
    """None inside the engine's step, DSTP's included; the loop reads one flag every stop_check_every (8) steps.
    Counted on the eager rows (the counter sees eager ops; the compiled rows run the same step)."""
    for r in speed_json["rows"]:
        if r["name"].startswith("hf_") or r["compiled"]:
            assert "loop_syncs_per_step" not in r
            continue
        policy = r["name"].startswith("fastv_dstp") or r["name"] == "visionpulse"  # DSTP's step or VisionPulse's
        assert r["dstp_syncs_per_step"] == (0.0 if policy else None)
        assert r["decode_step_syncs_per_step"] == 0.0
        assert r["loop_syncs_per_step"] <= 1 / 8


def test_visionpulse_row_reads_its_selection(speed_json):
    """VisionPulse (the authors' 10% setting): at most 10% of the visual tokens per step, every visual token's K/V
    held (the unpruned row's K/V, one more slot layout for the layers from the anchor on), fewer bytes read per step
    than unpruned, decode/ideal reported like every engine row."""
    by = {(r["scenario"], r["name"]): r for r in speed_json["rows"]}
    for scenario in SCENARIO_NAMES:
        cfg = SMALL[scenario]
        vp, dense = by[(scenario, "visionpulse")], by[(scenario, "engine_unpruned")]
        assert 1 <= vp["visual_tokens_per_step"] <= int(0.10 * cfg.visual_tokens)
        assert vp["memory_bytes"]["kv"] > dense["memory_bytes"]["kv"] and vp["memory_bytes"]["visionpulse"] > 0
        assert vp["memory_bytes"]["kv"] - dense["memory_bytes"]["kv"] < dense["memory_bytes"]["kv"] // 10
        assert vp["decode_bytes"] < dense["decode_bytes"] and vp["ratio_to_ideal"] > 0
        assert by[(scenario, "visionpulse_compiled")]["visual_tokens_per_step"] == vp["visual_tokens_per_step"]


def test_host_sync_counter():
    t = torch.arange(6)
    with HostSyncs() as c:
        bool(t.sum() > 0)
        t.tolist()
        t.nonzero()
        t.repeat_interleave(2)  # int repeats: no sync
        t[:3] + 1
    assert c.count == 3


@pytest.mark.parametrize("argv,needle", [
    (["--repeats", "0"], "repeats must be >= 1, got 0"),
    (["--scenario", "memory-bound"], "argument --scenario: invalid choice: 'memory-bound'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--dtype", "auto"], "give a dtype"),
    (["--new-tokens", "1"], "new_tokens must be >= 2"),
])
def test_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    assert run_cli(["speed", "--small", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, tmp_path):
    assert run_cli(["speed", "--small", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "this torch sees no CUDA device" in err and len(err.splitlines()) == 1
# the other two families `--model-config` builds, in their published layouts (Qwen2.5-VL: the LLM's fields at the top
# level, M-RoPE as `rope_scaling.type: mrope`; LLaVA-1.5: `image_token_index`, CLS dropped by the "default" strategy)
TINY_QWEN2_5_VL = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "bos_token_id": 245,
    "eos_token_id": 246, "vision_start_token_id": 248, "vision_end_token_id": 249, "image_token_id": 251,
    "video_token_id": 252, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_hidden_layers": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "max_window_layers": 28,
    "rope_theta": 1000000.0, "vocab_size": 256, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {"depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                      "in_chans": 3, "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [1], "temporal_patch_size": 2},
}
TINY_LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 250, "model_type": "llava",
    "pad_token_id": 251, "projector_hidden_act": "gelu", "tie_word_embeddings": False, "vocab_size": 256,
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                    "num_hidden_layers": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                    "vocab_size": 256},
    "vision_config": {"hidden_size": 32, "image_size": 56, "intermediate_size": 64, "model_type": "clip_vision_model",
                      "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 32},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
}


# -- the real scenario ----------------------------------------------------------------------------------------------
def write_config(folder: pathlib.Path, config: dict) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_qwen3_vl(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("tiny-qwen3-vl"), TINY_QWEN3_VL)


def test_synthetic_scenarios_keep_their_shapes():
    kv, wb = SCENARIOS["kv-bound"], SCENARIOS["weight-bound"]
    assert (kv.visual_tokens, kv.prompt_tokens, kv.kv_head_dim) == (2304, 2321, 64)
    assert (wb.visual_tokens, wb.prompt_tokens, wb.kv_head_dim) == (1024, 1041, 128)


def test_real_scenario_writes_every_row(tiny_qwen3_vl, tmp_path):
    """128x96 is below Qwen3-VL's 65,536-pixel floor: the processor scales it up to 320x224 (32 px a token) ->
    10 x 7 = 70 visual tokens; --layers cuts the LLM to 3 of the config's 4 layers."""
    assert run_cli(["speed", "--model-config", str(tiny_qwen3_vl), "--image", "128x96", "--layers", "3",
                    "--new-tokens", "6", "--sync-debug", "--compile-backend", "eager", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["scenario"], r["name"]) for r in result["rows"]] == [("real", n) for n in ROWS]
    c = result["scenarios"]["real"]
    assert c["architecture"] == "Qwen3VLForConditionalGeneration" and c["model_config"].endswith("config.json")
    assert (c["layers"], c["hidden"], c["heads"], c["kv_heads"], c["head_dim"], c["vocab"]) == (3, 64, 4, 2, 32, 256)
    assert (c["visual_tokens"], c["prompt_tokens"], c["batch"], c["image"]) == (70, 96, 1, "128x96")
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0 and (r["compiled"] or r["peak_bytes_measured"] > 0)
        assert r["decode_steps"] == 5
        if not r["name"].startswith("hf_"):
            assert r["ratio_to_ideal"] > 0 and r["peak_bytes_reported"] == sum(r["memory_bytes"].values())
            if not r["compiled"]:
                policy = r["name"].startswith("fastv_dstp") or r["name"] == "visionpulse"
                assert r["dstp_syncs_per_step"] == (0.0 if policy else None)
    static = next(r for r in result["rows"] if r["name"] == "hf_generate_static")
    assert static["compiled"] is True and static["compile_error"] is None  # its compile config, on CPU too
    assert {t["what"] for t in result["targets"]} >= {"fastv_dstp_store_compiled / fastv_compiled tokens/s"}


@pytest.mark.parametrize("config,visual", [(TINY_QWEN2_5_VL, 35), (TINY_LLAVA, 16)], ids=["qwen2_5_vl", "llava"])
def test_real_scenario_of_the_other_families(config, visual, tmp_path):
    """Qwen2.5-VL: 200x150 -> 196x140 (28 px a token) = 7 x 5 tokens; LLaVA: the tower's 56x56 input, 4 x 4."""
    folder = write_config(tmp_path / "model", config)
    assert run_cli(["speed", "--model-config", str(folder / "config.json"), "--image", "200x150",
                    "--new-tokens", "3", "--compile-backend", "eager", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert [r["name"] for r in result["rows"]] == list(ROWS)
    assert result["scenarios"]["real"]["visual_tokens"] == visual and result["scenarios"]["real"]["layers"] == 4


@pytest.mark.parametrize("folder,image,tokens,grid", [
    ("Qwen--Qwen3-VL-4B-Instruct", "1280x960", 1200, (1, 60, 80)),
    ("Qwen--Qwen2.5-VL-7B-Instruct", "1280x960", 1564, (1, 68, 92)),
    ("Qwen--Qwen3-VL-4B-Instruct", "4000x3000", 11750, (1, 188, 250)),
    ("Qwen--Qwen3-VL-4B-Instruct", "100x40", 78, (1, 12, 26)),
    ("llava-hf--llava-1.5-7b-hf", "1280x960", 576, None),
])
def test_real_inputs_of_the_published_configs(folder, image, tokens, grid):
    """The published configs (no model built): the real special token ids around the image's placeholders, and
    pixel_values / image_grid_thw of the shapes the family's processor gives (checked against it below)."""
    path = REAL_CONFIGS / folder
    if not (path / "config.json").is_file():
        pytest.skip(f"{path}/config.json not saved")
    cfg = real_speed_config(str(path), image=image)
    config, _, _ = real_hf_config(cfg.model_config, cfg.layers)
    batch = build_real_batch(cfg, config, "cpu", torch.bfloat16)
    ids = batch["input_ids"][0]
    visual = (ids == config.image_token_id).nonzero()[:, 0]
    assert cfg.visual_tokens == len(visual) == tokens and cfg.prompt_tokens == len(ids)
    assert bool((visual.diff() == 1).all())  # one image: its placeholders in one run
    if grid is None:  # LLaVA: BOS, then the image inside the text
        assert ids[0] == config.text_config.bos_token_id and batch["pixel_values"].shape == (1, 3, 336, 336)
    else:
        assert ids[visual[0] - 1] == config.vision_start_token_id and ids[visual[-1] + 1] == config.vision_end_token_id
        assert batch["image_grid_thw"].tolist() == [list(grid)]
        v = config.vision_config
        assert batch["pixel_values"].shape == (grid[1] * grid[2], 3 * v.temporal_patch_size * v.patch_size ** 2)
        assert torch.equal(batch["mm_token_type_ids"][0], (ids == config.image_token_id).int())
    special = {config.image_token_id, getattr(config, "vision_start_token_id", None),
               getattr(config, "vision_end_token_id", None), config.get_text_config().bos_token_id}
    text = [int(i) for i in ids if int(i) not in special]
    assert len(text) == cfg.prompt_text and max(text) < min(i for i in special if i is not None and i > 1000)


@pytest.mark.parametrize("folder", ["Qwen--Qwen3-VL-4B-Instruct", "Qwen--Qwen2.5-VL-7B-Instruct"])
@pytest.mark.parametrize("image", ["1280x960", "333x500", "4000x3000", "100x40"])
def test_real_image_layout_is_the_processors(folder, image):
    """What `real_image_layout` computes equals the published image processor's output for an image that size."""
    PIL = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    import numpy as np
    import transformers

    path = REAL_CONFIGS / folder
    if not (path / "preprocessor_config.json").is_file():
        pytest.skip(f"{path} not saved")
    w, h = (int(x) for x in image.split("x"))
    processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    out = processor(images=[PIL.fromarray(np.zeros((h, w, 3), np.uint8))], return_tensors="pt")
    config, _, family = real_hf_config(str(path / "config.json"))
    layout = real_image_layout(str(path / "config.json"), config, family, image)
    assert out["image_grid_thw"].tolist() == [list(layout["grid_thw"])]
    assert tuple(out["pixel_values"].shape) == layout["pixels"]


def _edited(change):
    config = copy.deepcopy(TINY_QWEN3_VL)
    change(config)
    return config


@pytest.mark.parametrize("config,argv,needle", [
    (None, ["--model-config", "{tmp}/absent.json"], "no such file"),
    (None, ["--model-config", "{tmp}"], "a folder without a config.json"),
    ("{nope", ["--model-config", "{tmp}/config.json"], "is not a JSON file"),
    (_edited(lambda c: c.update(architectures=["FooForCausalLM"], model_type="foo")), ["--model-config", "{tmp}"],
     "unsupported architecture 'FooForCausalLM'; dstp speed builds Qwen3VLForConditionalGeneration"),
    (_edited(lambda c: c.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next")),
     ["--model-config", "{tmp}"], "cannot build the inputs of LlavaNextForConditionalGeneration"),
    (_edited(lambda c: c.pop("image_token_id")), ["--model-config", "{tmp}"], "the field 'image_token_id' is missing"),
    (_edited(lambda c: c["text_config"].pop("hidden_size")), ["--model-config", "{tmp}"],
     "the field 'text_config.hidden_size' is missing"),
    (_edited(lambda c: c["vision_config"].pop("patch_size")), ["--model-config", "{tmp}"],
     "the field 'vision_config.patch_size' is missing"),
    (TINY_QWEN3_VL, ["--model-config", "{tmp}", "--layers", "2"], "--layers must be >= 3"),
    (TINY_QWEN3_VL, ["--model-config", "{tmp}", "--image", "1280"], "--image must be WIDTHxHEIGHT"),
    (TINY_QWEN3_VL, ["--model-config", "{tmp}", "--scenario", "both"], "--model-config runs the real scenario"),
    (TINY_QWEN3_VL, ["--model-config", "{tmp}", "--small"], "--small shrinks the synthetic scenarios"),
    (None, ["--scenario", "real"], "the real scenario needs --model-config PATH"),
    (None, ["--compile-backend", "nope"], "unknown torch.compile backend 'nope'"),
    (None, ["--layers", "4"], "--image and --layers shape the real scenario"),
])
def test_real_bad_input_is_one_line(config, argv, needle, capsys, tmp_path):
    if isinstance(config, dict):
        write_config(tmp_path, config)
    elif isinstance(config, str):
        (tmp_path / "config.json").write_text(config)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_cli(["speed", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
