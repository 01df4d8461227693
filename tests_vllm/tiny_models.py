"""Tiny random-weight checkpoints for the vLLM tests: LLaVA-1.5, Qwen2.5-VL, Qwen3-VL, saved with their real
processors and small real tokenizers (tests/hub_fixtures.py's builders), float32.

The language models have head_dim 64: vLLM 0.32's CPU attention backend takes head sizes 32, 64, 80, 96, 112, 128,
160, 192, 224, 256 and 512 (`get_supported_head_sizes`), not the hub fixtures' 16. Vision towers, tokenizers,
processors and chat templates are the hub fixtures' own; LLM ("tiny"): 2 layers, hidden 128, 2 heads of 64, 1 KV
head; weights N(0, 0.2) as there.
"""
from __future__ import annotations

import pathlib

import hub_fixtures as hub  # tests/hub_fixtures.py: pytest's `pythonpath` (pyproject.toml) puts tests/ on the path

FAMILIES = ("llava", "qwen2_5_vl", "qwen3_vl")

LAYERS = 2
# language models: "tiny" for the tests; "small" (about 13M parameters) for throughput runs, where the tiny one
# leaves only per-call overheads to measure
LMS = {"tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=2,
                    num_key_value_heads=1),
       "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2)}
SEEDS = {"llava": 21, "qwen2_5_vl": 23, "qwen3_vl": 24}


def _config(family: str, tok, lm_size: str = "tiny"):
    import transformers as tf

    V = hub._vocab_size(tok)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    lm = dict(vocab_size=V, tie_word_embeddings=False, **LMS[lm_size])
    if family == "llava":
        bos, eos, pad, image = hub._ids(tok, ["<s>", "</s>", "<pad>", "<image>"])
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=hub.LLAVA_IMAGE, patch_size=hub.LLAVA_PATCH, projection_dim=32,
                                     hidden_act="quick_gelu")
        text = tf.LlamaConfig(**lm, head_dim=64, max_position_embeddings=1024, rope_parameters=rope,
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_token_id=image,
                             image_seq_length=(hub.LLAVA_IMAGE // hub.LLAVA_PATCH) ** 2, projector_hidden_act="gelu",
                             tie_word_embeddings=False)
        return cfg, dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    eot, im_end, vs, ve, image, video = hub._ids(tok, ["<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = dict(image_token_id=image, video_token_id=video, vision_start_token_id=vs, vision_end_token_id=ve)
    text = dict(lm, max_position_embeddings=2048, bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
    geometry = dict(patch_size=hub.QWEN_PATCH, spatial_merge_size=hub.QWEN_MERGE, temporal_patch_size=hub.QWEN_TEMPORAL,
                    in_channels=3, hidden_size=32, intermediate_size=64, num_heads=4,
                    out_hidden_size=lm["hidden_size"])
    if family == "qwen2_5_vl":
        text["rope_parameters"] = dict(rope, mrope_section=[8, 12, 12])
        vision = dict(geometry, depth=2, window_size=2 * hub.QWEN_PATCH * hub.QWEN_MERGE, fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    else:
        text.update(head_dim=64, rope_parameters=dict(rope, mrope_section=[12, 10, 10], mrope_interleaved=True))
        vision = dict(geometry, depth=3, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return cfg, dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)


def build(family: str, directory, visual_tokens: int | None = None, lm_size: str = "tiny") -> pathlib.Path:
    """Write the family's tiny checkpoint (config, weights, processor, tokenizer, chat template) to `directory`.
    `visual_tokens` (throughput runs): LLaVA sees every image as that many tokens (a square number; 576 is
    LLaVA-1.5's), Qwen-VL images are capped at that many tokens instead of the hub fixtures' 80. `lm_size`: a
    key of LMS."""
    import torch
    import transformers as tf

    directory = pathlib.Path(directory)
    tok = hub._tokenizer(family)
    proc = hub._processor(family, tok)
    cfg, gen = _config(family, tok, lm_size)
    if visual_tokens is not None:
        if family == "llava":
            side = int(round(visual_tokens ** 0.5)) * hub.LLAVA_PATCH
            proc.image_processor = tf.CLIPImageProcessor(size={"shortest_edge": side},
                                                         crop_size={"height": side, "width": side},
                                                         do_center_crop=True, image_mean=hub.CLIP_MEAN,
                                                         image_std=hub.CLIP_STD)
            cfg.vision_config.image_size = side
            cfg.image_seq_length = (side // hub.LLAVA_PATCH) ** 2
        else:
            px = (hub.QWEN_PATCH * hub.QWEN_MERGE) ** 2
            proc.image_processor.size = {"shortest_edge": hub.QWEN_MIN_TOKENS * px, "longest_edge": visual_tokens * px}
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(SEEDS[family])
    model = getattr(tf, hub.MODEL_CLASSES[family])(cfg)
    hub._randomize(model, SEEDS[family])
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[hub.never_emitted_ids(tok, head.shape[0])] = 0.0
    model.generation_config = tf.GenerationConfig(**gen)
    model.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


sample_images = hub.sample_images
