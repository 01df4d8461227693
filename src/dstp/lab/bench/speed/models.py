"""The synthetic scenarios' model and inputs (`kv-bound`, `weight-bound`): a LLaVA-shaped model with random weights
(a 1-layer CLIP tower, a Llama LM of the scenario's shape) and a batch of random prompts with one image each."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dstp.lab.bench.speed.config import SpeedConfig

IMAGE_TOKEN = 3


def build_model(cfg: SpeedConfig, device, dtype):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=2 * cfg.grid, patch_size=2, projection_dim=32)
    text = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=cfg.grid ** 2 + cfg.prompt_text + cfg.new_tokens + 64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = None  # always generate new_tokens
    model.generation_config.pad_token_id = 0
    return model.to(device=device, dtype=dtype).eval()


def build_batch(cfg: SpeedConfig, device, dtype):
    g = torch.Generator().manual_seed(cfg.seed)
    text = torch.randint(10, cfg.vocab, (cfg.batch, cfg.prompt_text), generator=g)
    half = cfg.prompt_text // 2
    ids = torch.cat([torch.ones(cfg.batch, 1, dtype=torch.long), text[:, :half],
                     torch.full((cfg.batch, cfg.grid ** 2), IMAGE_TOKEN), text[:, half:]], 1)
    pixels = torch.randn(cfg.batch, 3, 2 * cfg.grid, 2 * cfg.grid, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}
