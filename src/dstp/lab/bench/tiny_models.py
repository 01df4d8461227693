"""Tiny random-weight models of every supported family, built in-process (no downloads).

Used by the tests (exactness against transformers) and by `dstp fidelity`."""
from __future__ import annotations

import copy

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
from transformers import (InternVLConfig, InternVLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, Qwen3VLMoeConfig,
                          Qwen3VLMoeForConditionalGeneration, SiglipVisionConfig)

from transformers import (Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                          Qwen3_5MoeForConditionalGeneration)

VOCAB = 128
IMAGE_TOKEN = 100


def _init(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif p.dim() == 1 and p.numel() > 1:
                p.normal_(1.0 if p.abs().sum() == p.numel() else 0.0, 0.02)
    return model.eval()


def left_pad(rows: list[torch.Tensor]):
    """Token rows -> (input_ids, attention_mask), padded on the left with id 0."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


def _llava_parts(layers: int):
    """The CLIP tower (30x30 views, 5x5 patches) and Llama LM shared by the tiny LLaVA and LLaVA-NeXT."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=30, patch_size=6, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                vision_feature_select_strategy="default", image_seq_length=25)


def _greedy_ready(model, seed: int):
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


def tiny_llava(seed: int = 0, layers: int = 4):
    cfg = LlavaConfig(**_llava_parts(layers))
    cfg._attn_implementation = "sdpa"
    return _greedy_ready(LlavaForConditionalGeneration(cfg), seed)


def llava_batch(batch_sizes_prefix: list[int], suffix: int = 5, seed: int = 0):
    """Left-padded LLaVA inputs: row b = BOS + prefix[b] text + 25 image tokens + suffix text."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in batch_sizes_prefix:
        text1 = torch.randint(3, 90, (n,), generator=g)
        text2 = torch.randint(3, 90, (suffix,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), text1, torch.full((25,), IMAGE_TOKEN), text2]))
    ids, mask = left_pad(rows)
    pixels = torch.randn(len(rows), 3, 30, 30, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_llava_next(seed: int = 0, layers: int = 4):
    """LLaVA-NeXT anyres on 30x30 views (5x5 CLIP patches); crops grids 1x2, 2x1 or 2x2 by image size."""
    cfg = LlavaNextConfig(**_llava_parts(layers), image_grid_pinpoints=[[30, 60], [60, 30], [60, 60]])
    cfg._attn_implementation = "sdpa"
    return _greedy_ready(LlavaNextForConditionalGeneration(cfg), seed)


def llava_next_batch(image_sizes: list[tuple[int, int]], prefix: list[int], suffix: int = 5, seed: int = 0):
    """Left-padded LLaVA-NeXT inputs: row b = BOS + prefix[b] text + its image's tokens + suffix text. The image
    token count of each size is the model's own (anyres crops, unpadding, newlines: weights play no part)."""
    model = tiny_llava_next()
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(image_sizes)
    pixels = torch.randn(len(image_sizes), 5, 3, 30, 30, generator=g)  # base view + up to 4 crops
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    counts = [f.shape[0] for f in feats.pooler_output]
    rows = []
    for n, count in zip(prefix, counts):
        text1 = torch.randint(3, 90, (n,), generator=g)
        text2 = torch.randint(3, 90, (suffix,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), text1, torch.full((count,), IMAGE_TOKEN), text2]))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}


def sliding(window: int | None) -> dict:
    """Qwen2/Qwen3 text-config keys for a sliding window on every layer but the first (None: none)."""
    return {} if window is None else dict(use_sliding_window=True, sliding_window=window, max_window_layers=1)


def tiny_qwen2_5_vl(seed: int = 0, layers: int = 4, window: int | None = None):
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **sliding(window),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


def qwen_batch(grids: list[tuple[int, int]], prefix: list[int], suffix: int = 4, seed: int = 0, patch=4,
               temporal=2, merge=2):
    """Left-padded Qwen2.5-VL inputs with images of different grid sizes (h, w in patches)."""
    g = torch.Generator().manual_seed(seed)
    rows, pixels, thw = [], [], []
    for (gh, gw), n in zip(grids, prefix):
        n_img = gh * gw // (merge * merge)
        text1 = torch.randint(3, 90, (n,), generator=g)
        text2 = torch.randint(3, 90, (suffix,), generator=g)
        rows.append(torch.cat([text1, torch.tensor([102]), torch.full((n_img,), IMAGE_TOKEN), torch.tensor([103]),
                               text2]))
        pixels.append(torch.randn(gh * gw, 3 * temporal * patch * patch, generator=g))
        thw.append([1, gh, gw])
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.tensor(thw), "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}


INTERNVL_TILE_TOKENS = 16  # 32x32 tile, patch 4 -> 8x8 patches, pixel shuffle 0.5 -> 4x4 tokens
IMG_START, IMG_END = 102, 103


# Qwen3-VL's tiny vision tower and M-RoPE (shared by the dense and MoE tiny models)
QWEN3_VL_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                       deepstack_visual_indexes=[0, 1, 2])
QWEN3_VL_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}


def tiny_qwen3_vl(seed: int = 0, layers: int = 4):
    """head_dim 32 so the interleaved M-RoPE sections [6, 5, 5] have the real model's layout; DeepStack
    from vision blocks 0, 1, 2 into LLM layers 0, 1, 2 (so it straddles a prune point at layer 2)."""
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         pad_token_id=0,
                         rope_parameters=copy.deepcopy(QWEN3_VL_ROPE)),
        vision_config=copy.deepcopy(QWEN3_VL_VISION), image_token_id=IMAGE_TOKEN, video_token_id=101,
        vision_start_token_id=102, vision_end_token_id=103)
    cfg._attn_implementation = "sdpa"
    model = Qwen3VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


def qwen3_vl_batch(grids: list[tuple[int, int]], prefix: list[int], suffix: int = 4, seed: int = 0):
    """Left-padded Qwen3-VL inputs (same layout as Qwen2.5-VL's: 4x4 patches, 2 frames, 2x2 merge)."""
    return qwen_batch(grids, prefix, suffix, seed)


def tiny_internvl(seed: int = 0, layers: int = 4, window: int | None = None):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=4)
    text = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **sliding(window))
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         image_seq_length=INTERNVL_TILE_TOKENS, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    model = InternVLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


def internvl_batch(tiles: list[int], prefix: list[int], suffix: int = 5, seed: int = 0):
    """Left-padded InternVL inputs: row b = prefix[b] text + <img> + 16 tokens per tile + </img> + suffix,
    with tiles[b] 32x32 tiles (pixel_values holds every row's tiles in order)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_tiles, n in zip(tiles, prefix):
        text1 = torch.randint(3, 90, (n,), generator=g)
        text2 = torch.randint(3, 90, (suffix,), generator=g)
        rows.append(torch.cat([text1, torch.tensor([IMG_START]),
                               torch.full((n_tiles * INTERNVL_TILE_TOKENS,), IMAGE_TOKEN),
                               torch.tensor([IMG_END]), text2]))
    ids, mask = left_pad(rows)
    pixels = torch.randn(sum(tiles), 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_llava_onevision(seed: int = 0, layers: int = 4):
    """LLaVA-OneVision on 24x24 SigLIP views (4x4 patches, all fed to the LLM), Qwen2 LM; crop grids up to 3x3, so
    a 3x3 image's unpadded features (up to 12x12) exceed anyres_max_4's 4 views and are downsampled."""
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=24, patch_size=6, vision_use_head=False)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=101,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio="anyres_max_4",
                               image_grid_pinpoints=[[24 * h, 24 * w] for h in (1, 2, 3) for w in (1, 2, 3)])
    cfg._attn_implementation = "sdpa"
    return _greedy_ready(LlavaOnevisionForConditionalGeneration(cfg), seed)


def llava_onevision_batch(images: list[list[tuple[int, int]]], prefix: list[int], suffix: int = 5, seed: int = 0):
    """Left-padded LLaVA-OneVision inputs: row b = prefix[b] text + its images' tokens + suffix text; images[b] lists
    the row's image sizes (h, w): none, one (anyres crops) or several (one view each). Token counts are the
    model's own (weights play no part)."""
    model = tiny_llava_onevision()
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([s for row in images for s in row]).view(-1, 2)
    per_row = torch.tensor([len(row) for row in images])
    pixels = torch.randn(sizes.shape[0], 10, 3, 24, 24, generator=g)  # base view + up to 9 crops
    batch_num_images = per_row[per_row > 0]
    counts = []
    if sizes.shape[0]:
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                                   batch_num_images=batch_num_images).pooler_output
        counts = [f.shape[0] for f in feats]
    rows, i = [], 0
    for row, n in zip(images, prefix):
        count = sum(counts[i:i + len(row)])
        i += len(row)
        text1 = torch.randint(3, 90, (n,), generator=g)
        text2 = torch.randint(3, 90, (suffix,), generator=g)
        rows.append(torch.cat([text1, torch.full((count,), IMAGE_TOKEN), text2]))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes,
            "batch_num_images": batch_num_images}


def tiny_qwen3_vl_moe(seed: int = 0, layers: int = 4):
    """Qwen3-VL's tiny layout (see tiny_qwen3_vl) with a mixture-of-experts LLM: 8 experts, top 2, in every layer
    but layer 1 (a dense MLP there, as `mlp_only_layers` allows)."""
    cfg = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         pad_token_id=0, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                         decoder_sparse_step=1, mlp_only_layers=[1],
                         rope_parameters=copy.deepcopy(QWEN3_VL_ROPE)),
        vision_config=copy.deepcopy(QWEN3_VL_VISION), image_token_id=IMAGE_TOKEN, video_token_id=101,
        vision_start_token_id=102, vision_end_token_id=103)
    cfg._attn_implementation = "sdpa"
    model = Qwen3VLMoeForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


def tiny_qwen3_5(seed: int = 0, layers: int = 4, moe: bool = False):
    """Hybrid LLM: Gated DeltaNet linear attention with full attention every fourth layer (layer 3 of 4); gated
    attention output, head_dim 64 with a quarter rotated (interleaved M-RoPE sections [3, 3, 2]); no DeepStack.
    `moe`: Qwen3.5-MoE's sparse MLP (4 experts, 2 a token, a shared expert)."""
    text = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                max_position_embeddings=512, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2],
                                 "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    text.update(dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                     num_experts_per_tok=2) if moe else dict(intermediate_size=128))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16)
    config_cls, model_cls = ((Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if moe else
                             (Qwen3_5Config, Qwen3_5ForConditionalGeneration))
    cfg = config_cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=101,
                     vision_start_token_id=102, vision_end_token_id=103)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


GEMMA4_IDS = dict(image_token_id=100, video_token_id=101, boi_token_id=102, eoi_token_id=103, audio_token_id=104,
                  boa_token_id=105, eoa_token_index=106)


def tiny_gemma4(seed: int = 0, window: int = 8, moe: bool = False):
    """Gemma 4's layout at a tiny width: five sliding layers (a window of `window` tokens) then one global layer with
    its own head size and K/V heads (keys are values), proportional partial rotary on the global layer, soft-capped
    logits, images attended both ways at sliding layers; `moe`: the 26B-A4B's MoE block beside the MLP."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                attention_k_eq_v=True, sliding_window=window, final_logit_softcapping=30.0,
                use_bidirectional_attention="vision", hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                vocab_size_per_layer_input=VOCAB, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                bos_token_id=2,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                    "rope_theta": 1000000.0}})
    if moe:
        text.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, **GEMMA4_IDS)
    cfg._attn_implementation = "sdpa"
    model = Gemma4ForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return _init(model, seed)


def gemma4_image_processor():
    """Gemma 4's own image processor at the tiny tower's patch size: at most 70 soft tokens per image."""
    from transformers import Gemma4ImageProcessor

    return Gemma4ImageProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)


def gemma4_batch(sizes: list[list[tuple[int, int]]], prefix: list[int], suffix: int = 4, seed: int = 0):
    """Left-padded Gemma 4 inputs: row b = prefix[b] text tokens, then per image <boi> + its soft tokens + <eoi> and
    one text token, then `suffix` text tokens; images of sizes (h, w) from Gemma 4's image processor (a row may
    have none)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for row in sizes for h, w in row]
    pixels = gemma4_image_processor()(images, return_tensors="pt") if images else {}
    counts = iter(pixels.get("num_soft_tokens_per_image", []))
    ids = GEMMA4_IDS
    rows = []
    for row, n in zip(sizes, prefix):
        parts = [torch.randint(3, 90, (n,), generator=g)]
        for _ in row:
            parts += [torch.tensor([ids["boi_token_id"]]), torch.full((int(next(counts)),), ids["image_token_id"]),
                      torch.tensor([ids["eoi_token_id"]]), torch.randint(3, 90, (1,), generator=g)]
        parts.append(torch.randint(3, 90, (suffix,), generator=g))
        rows.append(torch.cat(parts))
    input_ids, mask = left_pad(rows)
    batch = {"input_ids": input_ids, "attention_mask": mask,
             "mm_token_type_ids": (input_ids == ids["image_token_id"]).long()}
    if images:
        batch.update(pixel_values=pixels["pixel_values"], image_position_ids=pixels["image_position_ids"])
    return batch
